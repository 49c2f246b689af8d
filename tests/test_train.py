"""The trainer in-process (8 fake CPU devices from conftest): a real step per config on
tfds.testing.mock_data, sharding equivalence, NaN stop, corrupt-checkpoint fallback, warm start,
export, and every bad configuration. Tiny VGGs throughout. Budget: ~3.5 min on 2 shared cores (compilation dominates)."""
import json
import logging
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import vgg_flax
from train import trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train" / "configs"


def tiny(name="digits", **kw):
    """A config file's recipe on a tiny VGG and 32x32 crops (the recipe is what is under test)."""
    c = trainer.load_config(CONFIGS / f"{name}.py")
    c.model_overrides.update(width=0.125, hidden_size=16, pool_size=(1, 1))
    c.input.update(crop_size=32, resize_size=32, scale_min=32, scale_max=40, num_threads=1,
                   prefetch=2)
    c.update(batch_size=16, total_steps=2, checkpoint_every_steps=2, eval_every_steps=2,
             log_every_steps=1, eval_batch_size=40)
    c.mesh.data, c.mesh.model = -1, 1
    return set_keys(c, **kw)


def set_keys(c, **kw):
    """``c`` with dotted keys set, as ``--config.KEY=VALUE`` does ("mesh.data": 4)."""
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


# For runs whose point is not sharding (the trained fixture, the fallback, accumulation and
# the equivalence tests keep all 8 devices).
ONE_DEVICE = {"mesh.data": 1}


def params_of(result):
    return jax.tree.map(np.asarray, jax.device_get(result["state"]["params"]))


@pytest.mark.parametrize("name", ["imagenet_vgg11", "imagenet_vgg16", "imagenet_vgg16_bn"])
def test_one_real_step_per_config(name, tmp_path):
    # one device: the recipe is under test here, sharding in test_sharding_matches_one_device
    # (8 devices would double the compile time with oneDNN's partitioning callbacks)
    c = tiny(name, total_steps=1, eval_every_steps=1, checkpoint_every_steps=1, **ONE_DEVICE)
    with tfds.testing.mock_data(num_examples=40):
        result = trainer.train_and_evaluate(c, tmp_path)
    assert result["status"] == "done" and result["step"] == 1
    assert result["eval_examples"] == 40
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "loss" in r)
    eval_row = next(r for r in rows if "eval_top1" in r)
    assert train_row["step"] == 1 and math.isfinite(train_row["loss"])
    assert 0 <= eval_row["eval_top1"] <= eval_row["eval_top5"] <= 1
    assert (tmp_path / "checkpoints" / "1").is_dir()
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # the recipe is really the config's
    full = trainer.load_config(CONFIGS / f"{name}.py")
    assert result["state"]["params"]["fc8"]["kernel"].shape[-1] == 1000
    if name == "imagenet_vgg16_bn":
        assert full.compute_dtype == "bfloat16" and full.label_smoothing == 0.1


def test_paper_recipe_values():
    c = trainer.load_config(CONFIGS / "imagenet_vgg16.py")
    assert (c.batch_size, c.optimizer.momentum, c.optimizer.weight_decay, c.learning_rate,
            c.model_overrides.dropout_rate, c.schedule.name, c.schedule.plateau_factor) == (
        256, 0.9, 5e-4, 1e-2, 0.5, "plateau", 0.1)
    assert (c.input.scale_min, c.input.scale_max, c.input.crop_size, c.input.flip) == (256, 512, 224, True)
    assert c.input.colour_shift > 0
    a = trainer.load_config(CONFIGS / "imagenet_vgg11.py")  # net A: same recipe, for the paper's init
    assert a.model == "vgg11" and {**a.to_dict(), "model": "vgg16"} == c.to_dict()


# Equivalence runs: full learning rate from step 1 (no warmup), so every parameter really moves.
CONSTANT_LR = {"schedule.name": "constant", "schedule.warmup_steps": 0}


def run_steps(config, steps, tmp_path, metrics_out=None):
    """The trainer's own pieces (prepare, sharded init, donated train step, per-process input),
    without evaluation or checkpoints: (initial parameters, parameters after ``steps`` updates)."""
    setup, train_src, _ = trainer.prepare(config, tmp_path)
    state = setup.jit_init()(jax.random.key(setup.config.seed))
    initial = jax.tree.map(np.asarray, jax.device_get(state["params"]))  # before donation
    step = trainer.make_train_step(setup)
    data = iter(trainer.input_pipeline.train_dataset(setup.config, train_src, 0, 1))
    for _ in range(steps):
        state, metrics = step(state, trainer.global_batch(setup, next(data)), np.float32(1.0))
        assert metrics["finite"]
        if metrics_out is not None:
            metrics_out.append(jax.tree.map(float, jax.device_get(metrics)))
    return initial, jax.tree.map(np.asarray, jax.device_get(state["params"]))


def assert_equivalent(ref, got, initial, atol, what, frozen=()):
    """``got`` equals ``ref`` on every leaf within ``atol`` AND within 1% of how far that leaf
    moved from ``initial``: each leaf's tolerance is at most 1/100 of its own update, so a run
    that skipped (or half-applied) any leaf's update fails. ``frozen``: leaves whose gradient is
    identically zero (a conv bias followed by training-mode BatchNorm, which subtracts the
    batch mean) -- they must not move at all."""
    worst = (0.0, "")
    for (path, r), g, i in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                               jax.tree.leaves(initial)):
        name = jax.tree_util.keystr(path)
        moved, diff = float(np.abs(r - i).max()), float(np.abs(g - r).max())
        if any(f in name for f in frozen):
            assert moved < 1e-9 and float(np.abs(g - i).max()) < 1e-9, (what, name, moved)
            continue
        assert moved > 0 and diff <= atol and diff <= 0.01 * moved, \
            f"{what}: {name} moved {moved:.1e} from its init, differs by {diff:.1e}"
        worst = max(worst, (diff / moved, name))
    print(f"\n{what}: worst leaf {worst[1]} differs by {worst[0]:.1e} of its own update "
          f"({len(jax.tree.leaves(ref))} leaves)")


# conv1_1 ... conv5_2's biases in a BatchNorm VGG: BN's mean subtraction cancels them
BN_FROZEN = tuple(f"['conv{b}_{i}']['bias']" for b in range(1, 6) for i in range(1, 5))


def _run(tmp_path, name, **kw):
    c = tiny("digits", model="vgg11_bn", **CONSTANT_LR, **kw)
    c.model_overrides.dropout_rate = 0.5
    return run_steps(c, 3, tmp_path / name)


def test_sharding_matches_one_device(tmp_path):
    """data=4 x model=2 (fc6/fc7 tensor-parallel) and FSDP over 8 devices give one device's
    parameters after 3 SGD steps at the full learning rate (0.05, no warmup) with BatchNorm and
    dropout. Tolerance per leaf: 1e-6 absolute (reduction orders differ across devices) and 1%
    of the leaf's own update (measured worst: see the printed line)."""
    initial, ref = _run(tmp_path, "one", **{"mesh.data": 1, "mesh.model": 1})
    variants = {
        "tp": {"mesh.data": 4, "mesh.model": 2},
        "fsdp": {"mesh.data": 8, "mesh.model": 1, "sharding.fsdp": True, "sharding.fsdp_min_size": 1},
    }
    for name, kw in variants.items():
        got_initial, got = _run(tmp_path, name, **kw)
        for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(got_initial)):
            np.testing.assert_array_equal(a, b)  # the same starting point
        assert_equivalent(ref, got, initial, 1e-6, f"{name} vs 1 device after 3 steps",
                          frozen=BN_FROZEN)


def test_layouts_are_what_the_rules_say(tmp_path):
    from train import sharding
    c = trainer.resolved(tiny("digits", **{"mesh.data": 4, "mesh.model": 2, "sharding.fsdp": True,
                                           "sharding.fsdp_min_size": 1}))
    setup, _, _ = trainer.prepare(c, tmp_path)
    p = setup.shardings["params"]
    assert p["fc6"]["kernel"].spec == jax.sharding.PartitionSpec("data", "model")
    assert p["fc7"]["kernel"].spec == jax.sharding.PartitionSpec("model", "data")
    assert p["conv1_1"]["kernel"].spec[-1] == "data"
    mom = setup.shardings["opt_state"][1][0].trace  # sgd momentum follows its parameter
    assert mom["fc6"]["kernel"].spec == p["fc6"]["kernel"].spec
    assert sharding.mesh_shape(-1, 2, 8) == (4, 2)


def test_fsdp_divides_state_memory():
    """XLA's memory analysis of the sharded init: FSDP over 8 devices keeps ~1/8 of the state
    (params + momentum) per device. (train/memory_report.py prints the VGG-16 figures.)"""
    c = tiny("digits", model="vgg11", **{"mesh.data": 8, "sharding.fsdp_min_size": 1})
    c.model_overrides.hidden_size = 256
    rep = trainer.state_memory(c, num_classes=10, channels=1)
    c.sharding.fsdp = True
    fsdp = trainer.state_memory(c, num_classes=10, channels=1)
    assert rep["per_device_output_bytes"] >= rep["state_bytes_total"]
    assert fsdp["per_device_output_bytes"] < rep["state_bytes_total"] / 8 * 1.1


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Without BatchNorm or dropout, 4 micro-batches give the full batch's update (fp32 sums),
    on every leaf, at the full learning rate: within 1e-5 absolute and 1% of each leaf's update."""
    def run(name, accum):
        c = tiny("digits", model="vgg11", grad_accum_steps=accum, batch_size=32, **CONSTANT_LR)
        c.model_overrides.dropout_rate = 0.0
        return run_steps(c, 2, tmp_path / name)
    (initial, a), (_, b) = run("full", 1), run("accum", 4)
    assert_equivalent(a, b, initial, 1e-5, "4 micro-batches vs full batch")


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    """Warmup from 0 to lr 1e12: step 1 is fine (lr 0) and checkpointed, then it explodes."""
    c = tiny("digits", total_steps=40, checkpoint_every_steps=1, eval_every_steps=100,
             learning_rate=1e12, **ONE_DEVICE)
    with pytest.raises(trainer.TrainingDiverged, match="not finite at step") as e:
        trainer.train_and_evaluate(c, tmp_path)
    bad = int(str(e.value).split("not finite at step ")[1].split(":")[0])
    assert "\n" not in str(e.value) and f"the last good checkpoint is step {bad - 1}" in str(e.value)
    reported = str(e.value).split(" not finite")[0].split(", ")  # e.g. "loss nan", "gradient norm inf"
    assert reported and all(not math.isfinite(float(r.rsplit(" ", 1)[1])) for r in reported)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == bad - 1
    _, _, v, _ = trainer.restore_variables(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(v))


def test_plateau_divides_lr_and_only_n_checkpoints_are_kept(tmp_path, caplog):
    """The paper's rule: lr / 10 when validation accuracy stops improving (schedule.plateau_*,
    optax's reduce_on_plateau on 1 - top-1). A learning rate too small to change any prediction
    keeps top-1 flat (vgg11: no BatchNorm statistics to drift), so after patience=1 stalled evaluations the rate drops by 10, and again
    after the next ones. keep_checkpoints=2 of 6 saves leaves exactly the last two."""
    c = tiny("digits", model="vgg11", total_steps=6, checkpoint_every_steps=1, eval_every_steps=1,
             keep_checkpoints=2, learning_rate=1e-9, **ONE_DEVICE, **{
                 "schedule.name": "plateau", "schedule.warmup_steps": 0,
                 "schedule.plateau_patience": 1, "schedule.plateau_factor": 0.1,
                 "schedule.plateau_cooldown": 0})
    with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
        result = trainer.train_and_evaluate(c, tmp_path)
    assert result["status"] == "done"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_top1"] for r in rows if "eval_top1" in r]
    assert len(evals) == 6 and len(set(evals)) == 1, evals  # accuracy really stalled
    lrs = [r["lr"] for r in rows if "loss" in r]
    print(f"\nplateau: lr per step {lrs}")
    # steps 1-2 at the full rate (the first evaluation sets the best); from the second
    # evaluation on every one stalls, and with patience 1 each divides the rate by 10
    assert lrs == pytest.approx([1e-9, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13], rel=1e-6), lrs
    assert "validation accuracy plateaued" in caplog.text
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [5, 6]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step digits run (checkpoints at 2 and 4) shared by the resume-side tests."""
    workdir = tmp_path_factory.mktemp("trained")
    result = trainer.train_and_evaluate(tiny("digits", total_steps=4), workdir)
    return workdir, result


def test_run_writes_metrics_events_plot_checkpoints(trained):
    workdir, result = trained
    assert result["status"] == "done" and result["step"] == 4 and result["eval_examples"] == 360
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert {"loss", "top1", "top5", "lr", "img_per_s"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval_top1" in r] == [2, 4]
    assert list(workdir.glob("events.out.tfevents.*"))
    assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_corrupt_latest_checkpoint_falls_back(trained, tmp_path, caplog):
    """Step 4's arrays damaged: warn, restore step 2, retrain to 4 -> the same parameters."""
    src, reference = trained
    import shutil
    shutil.copytree(src, tmp_path / "run")
    damaged = 0
    for f in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
            damaged += 1
    assert damaged
    with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
        result = trainer.train_and_evaluate(tiny("digits", total_steps=4), tmp_path / "run")
    assert "checkpoint step 4" in caplog.text and "falling back" in caplog.text
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert result["step"] == 4 and list((tmp_path / "run" / "corrupt_checkpoints").iterdir())
    for a, b in zip(jax.tree.leaves(params_of(reference)), jax.tree.leaves(params_of(result))):
        np.testing.assert_array_equal(a, b)


def random_variables(module, x, seed, scale=1.0):
    """A model's variables with normal values (numpy) where the values do not matter. The
    model's own initialiser compiles one ~0.5 s threefry fusion per parameter (~3 s each when
    run eagerly)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype),
                        dict(shapes))


def test_export_and_warm_start(trained, tmp_path, caplog):
    workdir, result = trained
    out = trainer.export(workdir, tmp_path / "exported")
    module, variables = vgg_flax.load(out)
    trained_state = jax.device_get(result["state"])
    for a, b in zip(jax.tree.leaves(trained_state["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(trained_state["batch_stats"]),
                    jax.tree.leaves(variables["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.zeros((2, 32, 32, 1), np.float32)
    assert module.apply(variables, x).shape == (2, 10)
    with pytest.raises(FileExistsError):
        trainer.export(workdir, out)
    # fine-tuning to another label set: fc8 re-initialised, everything else copied
    fresh = random_variables(module.clone(num_classes=7), x, seed=1)
    warm, notes = trainer.warm_start(fresh, str(out))
    assert any("fc8 re-initialised" in n for n in notes)
    np.testing.assert_array_equal(warm["params"]["fc7"]["kernel"], variables["params"]["fc7"]["kernel"])
    np.testing.assert_array_equal(warm["params"]["fc8"]["kernel"], fresh["params"]["fc8"]["kernel"])
    # the paper's deeper-net init: vgg11's conv1_1, conv2_1, conv3_1, conv3_2 and FCs into vgg13
    deep = vgg_flax.create("vgg13_bn", num_classes=10, width=0.125, hidden_size=16, pool_size=(1, 1))
    dv = random_variables(deep, x, seed=0)
    warm, _ = trainer.warm_start(dv, str(out), "paper")
    for layer in trainer.PAPER_INIT_LAYERS:
        np.testing.assert_array_equal(warm["params"][layer]["kernel"], variables["params"][layer]["kernel"])
    np.testing.assert_array_equal(warm["params"]["conv1_2"]["kernel"], dv["params"]["conv1_2"]["kernel"])
    with pytest.raises(trainer.ConfigError, match="conv1_2"):
        trainer.warm_start(dv, str(out), "conv1_2")
    # through the trainer: the warmup's first learning rate is 0, so step 1 holds the export
    with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
        trainer.train_and_evaluate(tiny("digits", total_steps=4, checkpoint_every_steps=1,
                                        keep_checkpoints=5, init_from=str(out), **ONE_DEVICE),
                                   tmp_path / "warm")
    assert "warm start from" in caplog.text
    _, _, v1, _ = trainer.restore_variables(tmp_path / "warm", step=1)
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(v1["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"model": "vgg17"}, "unknown model 'vgg17'"),
    ({"dataset": "no_such_dataset"}, "unknown dataset 'no_such_dataset'"),
    ({"batch_size": 18}, "batch_size 18 is not divisible by mesh.data=8"),
    ({"mesh.data": 8, "mesh.model": 2}, "does not fit the 8 available device"),
    ({"dataset": "imagenet2012", "manual_dir": "/nonexistent/tars"}, "manual_dir /nonexistent/tars does not exist"),
    ({"schedule.name": "linear"}, "unknown schedule.name"),
    ({"grad_accum_steps": 3}, "not divisible by mesh.data=8 x grad_accum_steps=3"),
    ({"init_from": "/nonexistent"}, "is not a vgg_flax checkpoint"),
    ({"input.crop_size": 16, "input.scale_min": 16, "input.resize_size": 16}, "below vgg11_bn's minimum input 32"),
    # model_overrides pass the VGG's own field rules (fields.FIELDS), as create/load/--set do
    ({"model_overrides.pool_size": (7,)}, r"model_overrides.pool_size \(.*\) must be two positive integers"),
    ({"model_overrides.conv": "cuda"}, r"model_overrides.conv \(.*\) must be 'auto', 'onednn' or 'xla'"),
    ({"model_overrides.bn_epsilon": 0.0}, r"model_overrides.bn_epsilon \(.*\) must be a finite number > 0, got 0.0"),
    ({"model_overrides.num_classes": 5}, "model_overrides.num_classes cannot be set .the dataset sets it"),
    ({"model_overrides.dtype": "bfloat16"}, "model_overrides.dtype cannot be set .set compute_dtype"),
    ({"model_overrides.taps": ("relu1_1",)}, "taps=.*training needs the classifier's logits"),
    ({"model_overrides.include_top": False}, "include_top=False: training needs the classifier's logits"),
])
def test_bad_config_fails_before_compiling(change, message, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
    with pytest.raises(trainer.ConfigError, match=message) as e:
        trainer.train_and_evaluate(tiny("digits", **change), tmp_path)
    assert "\n" not in str(e.value) and not compiled


def test_imagenet_without_manual_dir_is_one_line(tmp_path):
    """Not prepared, no archives given: one line that says where to put them."""
    c = tiny("imagenet_vgg16", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(trainer.ConfigError, match="--config.manual_dir") as e:
        trainer.prepare(c, tmp_path)
    assert "\n" not in str(e.value)


def test_bf16_training_follows_fp32(tmp_path):
    """compute_dtype=bfloat16 (fp32 parameters) takes the fp32 run's steps: 2 SGD steps of
    vgg11 (no dropout) at the full learning rate from the same init; every leaf's update has
    cosine >= 0.99 with the fp32 update and the whole update's relative error is <= 2e-2
    (bf16 keeps 8 mantissa bits; measured 3.4e-3 and worst cosine 0.998)."""
    def run(name, dtype):
        c = tiny("digits", model="vgg11", compute_dtype=dtype, **CONSTANT_LR, **ONE_DEVICE)
        c.model_overrides.dropout_rate = 0.0
        return run_steps(c, 2, tmp_path / name)
    (i32, p32), (i16, p16) = run("fp32", "float32"), run("bf16", "bfloat16")
    worst, num, den = (1.0, ""), 0.0, 0.0
    for (path, a), b, ia, ib in zip(jax.tree_util.tree_leaves_with_path(p32), jax.tree.leaves(p16),
                                    jax.tree.leaves(i32), jax.tree.leaves(i16)):
        np.testing.assert_array_equal(ia, ib)  # same start, fp32 parameters in both
        assert b.dtype == np.float32
        u32, u16 = (a - ia).ravel().astype(np.float64), (b - ib).ravel().astype(np.float64)
        cos = float(u32 @ u16 / np.linalg.norm(u32) / np.linalg.norm(u16))
        worst = min(worst, (cos, jax.tree_util.keystr(path)))
        num, den = num + float(((u16 - u32) ** 2).sum()), den + float((u32 ** 2).sum())
    rel = (num / den) ** 0.5
    print(f"\nbf16 vs fp32 updates: relative error {rel:.2e}, worst leaf cosine {worst[0]:.4f} "
          f"({worst[1]})")
    assert worst[0] >= 0.99, worst
    assert rel <= 2e-2


def test_checkpointing_leaves_orbax_global_registry_and_logs_alone(tmp_path, caplog):
    """The trainer's handler options (replica-parallel saving above 16 MiB) live in its own
    managers' registry: orbax's global jax.Array handler is the same object after a save, and
    orbax logs no warning ("Type handler registry ... overriding jax.Array") doing it."""
    import orbax.checkpoint as ocp

    from train.checkpoints import checkpoint_manager, save_state
    before = ocp.type_handlers.get_type_handler(jax.Array)
    state = {"params": {"fc8": {"kernel": jax.numpy.ones((4, 3))}}, "step": jax.numpy.array(2)}
    with caplog.at_level(logging.WARNING):
        mngr = checkpoint_manager(tmp_path, tiny(async_checkpointing=False))
        mngr.save(2, args=ocp.args.Composite(state=save_state(state),
                                             meta=ocp.args.JsonSave({"step": 2})))
        mngr.wait_until_finished()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=a.sharding), state)
        back = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        mngr.close()
    assert ocp.type_handlers.get_type_handler(jax.Array) is before
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert np.array_equal(back["state"]["params"]["fc8"]["kernel"], np.ones((4, 3)))
