"""The trainer's public names in one place, for ``from train import trainer``.

Each concern lives in its own module: validation (config checks), state (model, optimizer,
shardings), steps (jitted train/eval steps), warm_start, checkpoints (resume policy), rundir
(train_config.json, export), metrics (jsonl, TensorBoard, curves), signals (SIGTERM/SIGINT),
loop (train_and_evaluate) and memory (compiled memory and communication).
"""
from train import input_pipeline, sharding  # noqa: F401  (tests reach them through trainer)
from train.checkpoints import (CheckpointMismatch, NoReadableCheckpoint, check_fits,  # noqa: F401
                               checkpoint_manager, restore_latest)
from train.loop import prepare, train_and_evaluate  # noqa: F401
from train.memory import (collective_bytes, cpu_only_calls, custom_calls,  # noqa: F401
                          export_step, state_memory, step_memory)
from train.metrics import MetricWriter, plot_metrics  # noqa: F401
from train.rundir import (CADENCE_KEYS, CONFIG_FILE, PLACEMENT_KEYS, check_drift,  # noqa: F401
                          config_changes, export, read_run, restore_variables)
from train.signals import StopFlag  # noqa: F401
from train.state import (Setup, make_model, make_optimizer, make_plateau,  # noqa: F401
                         make_schedule, plateau_from_json, plateau_to_json)
from train.steps import (_normalise, evaluate, global_batch, make_eval_step,  # noqa: F401
                         make_train_step)
from train.validation import (REQUIRED_KEYS, ConfigError, TrainingDiverged,  # noqa: F401
                              load_config, resolved, validate)
from train.warm_start import PAPER_INIT_LAYERS, warm_start  # noqa: F401
