"""The per-layer benchmark runs end to end at its smallest size (a smoke test: no timing is
asserted; bench.py's smoke is the README command in tests/test_readme.py), and the host allocator
it runs under is tuned where, and only where, JAX computes on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layers_smoke(tmp_path):
    out = tmp_path / "layers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/layers.py"), "--batch", "1", "--size", "32",
           "--reps", "1", "--json", str(out), "--md", str(tmp_path / "layers.md")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VGG_FLAX_MALLOC": "default"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"fp32", "bf16"}
    for r in rows["fp32"] + rows["bf16"]:
        assert all(v > 0 for k, v in r.items() if k not in ("layer", "count")), r
    assert len(rows["fp32"]) == 9 + 5  # VGG-16's distinct convolution shapes and its five pools
    bad = subprocess.run([*cmd[:2], "--size", "100"], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert bad.returncode == 2 and "--size must be a multiple of 32" in bad.stderr


HOST_MALLOC_PROBE = """
import os, resource
import jax, jax.numpy as jnp
if os.environ.get("JAX_FIRST"):
    jnp.ones(3).block_until_ready()  # JAX's backend (and XLA's worker threads) started first
import vgg_flax
x = jnp.ones((1 << 25,), jnp.float32)
# a 128 MiB temporary (the barrier keeps XLA from fusing sin into the sum), a scalar out;
# cumsum made one too, at 2-3x the CPU time
f = jax.jit(lambda x: jax.lax.optimization_barrier(jnp.sin(x)[::-1]).sum())
def faults_of_one_execution():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# glibc settles where the blocks go within a few executions: the steady state is the last five
print(vgg_flax.HOST_MALLOC)
print(min([faults_of_one_execution() for _ in range(10)][5:]))
"""


PLUGIN_PROBE = """
import os
import jax.numpy as jnp
import vgg_flax
from vgg_flax import perf
print(vgg_flax.HOST_MALLOC)
os.environ["VGG_FLAX_MALLOC"] = "tuned"  # forcing it, in the same process before JAX starts
perf.tune_host_malloc.cache_clear()
print(perf.tune_host_malloc())
print(float(jnp.ones(3).sum()))  # JAX found the plugin, initialised it and runs on the CPU
"""


def test_host_allocator_tuned_at_import_where_jax_computes_on_cpu(tmp_path):
    """``import vgg_flax`` applies the glibc settings in-process (no restart), before XLA's
    worker threads exist, where JAX will compute on the CPU: a compiled program's large
    temporaries are then served from the heap again on each execution, without page faults.
    Imported after JAX ran something, the worker threads keep glibc's defaults (the status says
    "tuned late"); VGG_FLAX_MALLOC=default opts out. Both fault the temporary in again every
    time (one fault per page). Fewest faults of executions 6-10 (the first few settle where
    glibc puts the blocks). An installed accelerator plugin (a fake one, which JAX discovers,
    initialises and ignores) leaves malloc alone, saying why, unless JAX_PLATFORMS=cpu or
    VGG_FLAX_MALLOC=tuned. The four processes run at once."""
    plugin = tmp_path / "jax_plugins" / "fake_accel"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("def initialize():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "VGG_FLAX_"))
           and k not in ("JAX_PLATFORMS", "PJRT_NAMES_AND_LIBRARY_PATHS", "TPU_LIBRARY_PATH")}
    env["PYTHONPATH"] = str(ROOT)
    with_plugin = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    cases = {"cpu": (HOST_MALLOC_PROBE, {"JAX_PLATFORMS": "cpu", **with_plugin}),
             "jax first": (HOST_MALLOC_PROBE, {"JAX_FIRST": "1"}),
             "opt-out": (HOST_MALLOC_PROBE, {"VGG_FLAX_MALLOC": "default"}),
             "plugin": (PLUGIN_PROBE, with_plugin)}
    procs = {case: subprocess.Popen([sys.executable, "-c", script], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**env, **extra})
             for case, (script, extra) in cases.items()}
    runs = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (case, err[-2000:])
        runs[case] = out.strip().split("\n")
    runs.update({case: (lines[0], int(lines[1])) for case, lines in runs.items()
                 if case != "plugin"})  # (status, faults)
    # 128 MiB faults in as 32768 4-KiB pages, or 64 2-MiB ones with transparent huge pages
    assert runs["cpu"][0] == "tuned (JAX_PLATFORMS=cpu)" and runs["cpu"][1] < 16, runs
    assert runs["jax first"][0].startswith("tuned late (JAX's default backend is cpu; ")
    assert runs["jax first"][1] >= 64, runs
    assert runs["opt-out"][0] == "default (VGG_FLAX_MALLOC=default)", runs
    assert runs["opt-out"][1] >= 64, runs
    untouched, forced, jax_ran = runs["plugin"]
    assert untouched.startswith("default (accelerator plugin jax_plugins.fake_accel installed, "
                                "JAX_PLATFORMS unset: "), untouched
    assert "VGG_FLAX_MALLOC=tuned" in untouched
    assert forced == "tuned (VGG_FLAX_MALLOC=tuned)" and jax_ran == "3.0", runs


@pytest.mark.parametrize("platforms, where", [("cpu", "cpu"), ("cpu,cuda", "cpu"),
                                              ("cuda", "cuda"), ("gpu,cpu", "gpu"),
                                              ("tpu", "tpu")])
def test_where_jax_computes_reads_jax_platforms(platforms, where):
    """JAX_PLATFORMS' first entry is JAX's default backend; decided without starting one."""
    from vgg_flax import perf
    assert perf.where_jax_computes(platforms) == (where, f"JAX_PLATFORMS={platforms}")


def test_where_jax_computes_sees_plugins_as_jax_does(monkeypatch):
    from vgg_flax import perf
    monkeypatch.setenv("PJRT_NAMES_AND_LIBRARY_PATHS", f"mydev{os.pathsep}/opt/libmydev.so")
    where, why = perf.where_jax_computes("")
    assert where == "accelerator" and "mydev (PJRT_NAMES_AND_LIBRARY_PATHS)" in why
