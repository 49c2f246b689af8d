"""Every field of ``vgg_flax.VGG`` from the command line on every config (issue 24):
``--config.model_overrides.FIELD=VALUE`` parses by the field's type, passes
``vgg_flax.fields.validate_fields``, reaches the model, and is recorded in train_config.json and
read back from it; a bad value or a misspelt field is one line and exit 2. Where the compiled
programs are kept (``config.compile_cache``). Budget: a few seconds (nothing compiles)."""
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import vgg_flax
from train import compile_cache, input_pipeline, rundir, trainer
from train import train as train_cli
from train.state import make_model
from train.validation import check_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base"))

# A value other than the default for every VGG field, as typed on the command line, and what
# the model then holds. cfg and the tuples are Python literals; dtypes and precisions names.
ON_THE_COMMAND_LINE = {
    "cfg": ("(8,'M',16,'M')", (8, "M", 16, "M")),
    "batch_norm": ("True", True),
    "head": ("fc", "fc"),
    "include_top": ("True", True),
    "dropout_rate": ("0.25", 0.25),
    "hidden_size": ("32", 32),
    "width": ("0.5", 0.5),
    "pool_size": ("(2,3)", (2, 3)),
    "l2norm": ("False", False),
    "dense": ("True", True),
    "taps": ("()", ()),
    "bn_momentum": ("0.2", 0.2),
    "bn_epsilon": ("0.001", 0.001),
    "lrn_size": ("3", 3),
    "lrn_alpha": ("0.0002", 0.0002),
    "lrn_beta": ("0.5", 0.5),
    "lrn_k": ("1.5", 1.5),
    "param_dtype": ("bfloat16", jnp.bfloat16),
    "precision": ("highest", "highest"),
    "conv": ("xla", "xla"),
}
# Fields the trainer sets itself: still known keys, refused in one line saying why.
SET_BY_TRAINER = {"num_classes": ("3", "the dataset sets it"),
                  "dtype": ("bfloat16", "set compute_dtype instead")}


def parse(name, *args):
    """The config train.py builds from ``--config=train/configs/NAME.py ARGS``."""
    argv = ["train.py", f"--config={ROOT / 'train' / 'configs' / name}.py", *args]
    fv = train_cli.flags.FlagValues()
    train_cli._define_flags(fv, argv)
    fv(argv)
    return fv.config


def test_the_table_covers_every_field():
    fields = {f.name for f in dataclasses.fields(vgg_flax.VGG)} - {"parent", "name"}
    assert set(ON_THE_COMMAND_LINE) | set(SET_BY_TRAINER) == fields


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_from_the_command_line(name, tmp_path):
    args = [f"--config.model_overrides.{k}={v}" for k, (v, _) in ON_THE_COMMAND_LINE.items()]
    config = trainer.resolved(parse(name, *args))
    check_model(config)
    info = input_pipeline.DatasetInfo(7, 3, 0, 0)
    model = make_model(config, info.num_classes)
    for key, (_, want) in ON_THE_COMMAND_LINE.items():
        got = getattr(model, key)
        assert (jnp.dtype(got) == jnp.dtype(want)) if key == "param_dtype" else got == want, key
    assert model.num_classes == 7 and model.dtype == jnp.dtype(config.compute_dtype)
    # recorded in train_config.json, and the run read back from it builds the same model
    rundir.write_run_config(tmp_path, config, info)
    saved = json.loads((tmp_path / trainer.CONFIG_FILE).read_text())["config"]["model_overrides"]
    assert saved["conv"] == "xla" and saved["param_dtype"] == "bfloat16"
    assert saved["pool_size"] == [2, 3] and saved["cfg"] == [8, "M", 16, "M"]
    again, _ = rundir.read_run(tmp_path)
    assert make_model(again, info.num_classes) == model
    # a resume under another value of a field is a change of meaning, named in one line
    assert rundir.config_changes(config, tmp_path) == {}
    other = trainer.resolved(parse(name, *args[:-1], "--config.model_overrides.conv=auto"))
    assert rundir.config_changes(other, tmp_path) == {"model_overrides.conv": ("xla", "auto")}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg, message", [
    ("--config.model_overrides.hidden_size=1.5",
     "--config.model_overrides.hidden_size=1.5: invalid literal for int()"),
    ("--config.model_overrides.batch_norm=maybe", "--config.model_overrides.batch_norm"),
    ("--config.model_overrides.conv=cuda", "model_overrides.conv (convolution implementation) "
                                           "must be 'auto', 'onednn' or 'xla', got 'cuda'"),
    ("--config.model_overrides.param_dtype=int8", "model_overrides.param_dtype (parameter "
                                                  "dtype) must be float32, bfloat16 or float16"),
    ("--config.model_overrides.pool_size=(0,7)", "model_overrides.pool_size"),
    ("--config.model_overrides.widht=0.5", "unknown config key 'model_overrides.widht' in "
     "--config.model_overrides.widht=0.5; did you mean --config.model_overrides.width?"),
    ("--config.model_overrides.convv=xla", "did you mean --config.model_overrides.conv?"),
    ("--config.model_overrides.num_classes=3", "model_overrides.num_classes cannot be set "
                                               "(the dataset sets it)"),
    ("--config.model_overrides.dtype=bfloat16", "set compute_dtype instead"),
])
def test_a_bad_field_is_one_line_exit_2(name, arg, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled"))
    code = train_cli.main(["train.py", f"--config={ROOT / 'train' / 'configs' / name}.py",
                           f"--workdir={tmp_path / 'w'}", "--config.data_dir=/nonexistent", arg])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]
    assert not (tmp_path / "w").exists()


def test_a_misspelt_field_in_a_config_file_names_the_nearest():
    c = parse("digits")
    with c.unlocked():
        c.model_overrides.hiden_size = 8
    with pytest.raises(trainer.ConfigError, match=r"^model_overrides.hiden_size is not a VGG "
                       r"field; did you mean --config.model_overrides.hidden_size\?$"):
        check_model(c)


# -- where compiled programs are kept ------------------------------------------------------------

@pytest.mark.parametrize("value, env, want", [
    (None, {"JAX_COMPILATION_CACHE_DIR": "{tmp}/jaxenv", "VGG_FLAX_CACHE": "{tmp}/vf"},
     "{tmp}/jaxenv"),                                    # the user's JAX setting wins the default
    (None, {"VGG_FLAX_CACHE": "{tmp}/vf"}, "{tmp}/vf/xla"),
    (None, {}, "{tmp}/run/xla_cache"),
    ("{tmp}/mine", {"JAX_COMPILATION_CACHE_DIR": "{tmp}/jaxenv"}, "{tmp}/mine"),  # the key wins
    ("off", {"JAX_COMPILATION_CACHE_DIR": "{tmp}/jaxenv"}, None),
    ("", {}, None),
])
def test_where_the_compilation_cache_is(value, env, want, tmp_path, monkeypatch):
    for k in ("JAX_COMPILATION_CACHE_DIR", "VGG_FLAX_CACHE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    c = parse("digits", *([] if value is None else [f"--config.compile_cache={value.format(tmp=tmp_path)}"]))
    # the test process's own cache (tests/conftest.py) is not what is under test; nothing
    # compiles while it is unset
    ours = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        got = compile_cache.resolve(c, tmp_path / "run")
    finally:
        jax.config.update("jax_compilation_cache_dir", ours)
    assert got == (None if want is None else Path(want.format(tmp=tmp_path)))


def test_a_bad_compilation_cache_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = train_cli.main(["train.py", f"--workdir={tmp_path / 'w'}",
                           f"--config.compile_cache={tmp_path / 'file'}"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: compile_cache {tmp_path / 'file'} is a file, not a directory; "
                      "pass a directory with --config.compile_cache=DIR, or "
                      "--config.compile_cache=off")
