"""Shared fixtures. Expensive things (torchvision models, converted weights) are session-scoped."""
import os
import shutil
import tempfile

import pytest

# Several CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# glibc's defaults for the test processes: tuned, a process keeps every heap peak, and a worker
# that builds hundreds of models grew to 15 GB (two of them exhausted 24 GB). The tests of the
# tuning run their own processes (tests/test_bench.py).
os.environ.setdefault("VGG_FLAX_MALLOC", "default")
# The two pytest-xdist workers and their subprocesses share the cores. GNU OpenMP's threads
# (torch's and oneDNN's) otherwise spin for a while after each parallel region, on a core the
# other worker is waiting for. Passive: two concurrent runs (test_transforms.py beside
# test_onednn.py and test_nnx.py) took 73 s instead of 78-79 s. Scheduling only: no result
# depends on it. Set here, before any OpenMP runtime loads; workers and subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# One persistent compilation cache for the whole run: both pytest-xdist workers and every CLI
# subprocess (they inherit the environment) read a program another test already compiled. A
# tiny VGG's init alone takes ~10 s to compile here (each parameter's threefry draw is its own
# ~0.5 s fusion) and dozens of tests build the same ones. The controller creates it (workers
# start after this runs) and removes it at the end. Multi-device programs holding oneDNN
# convolutions are never served from it (their custom_partitioning key is per process).
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="vgg_flax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
else:
    _CACHE = None


def pytest_unconfigure(config):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


# The heaviest modules first (seconds on 2 shared cores, measured with --durations=0), so that
# the two pytest-xdist workers (--dist loadfile: a module stays on one worker, and a worker takes
# the next module when it has two tests left) end together instead of one running a long module
# alone at the end.
HEAVIEST_FIRST = ["test_readme", "test_parity", "test_train_cli", "test_train", "test_convert",
                  "test_bench", "test_transforms", "test_export", "test_pretrained",
                  "test_evaluate", "test_nnx", "test_model", "test_lpips", "test_onednn", "test_nan",
                  "test_input_pipeline_bench", "test_folder", "test_train_resume",
                  "test_train_pod", "test_jax_internals", "test_device_arrays", "test_convert_signals",
                  "test_no_torch_at_run_time", "test_scripts", "test_classify", "test_preprocess",
                  "test_bad_input", "test_augment", "test_train_inputs", "test_train_overrides"]


def pytest_configure(config):
    # pytest-xdist (>= 3.6) reorders loadfile's modules by test count unless told not to: that
    # put the one-test digits demo last, alone on one worker. Keep the order above.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable within


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """A worker runs many modules: drop each module's compiled programs when it ends (a worker
    otherwise grows past 10 GB)."""
    yield
    import gc
    import jax
    jax.clear_caches()
    gc.collect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Parity rows a test measured ride on its report (so they reach the summary from pytest-xdist
    workers too)."""
    outcome = yield
    report = outcome.get_result()
    table = getattr(item.module, "PARITY_TABLE", None)
    if report.when == "call" and table:
        report.user_properties += [("parity", (str(w), float(d), float(r))) for w, d, r in table]
        table.clear()


def pytest_terminal_summary(terminalreporter):
    """The parity table (variant, size, max abs and relative diff) of this run."""
    rows = [value for reports in terminalreporter.stats.values() for r in reports
            for key, value in getattr(r, "user_properties", ()) if key == "parity"]
    if rows:
        terminalreporter.section("parity against torchvision (fp32, highest precision)")
        terminalreporter.write_line(f"{'case':<44} {'max abs diff':>14} {'relative':>10}")
        for what, diff, rel in rows:
            terminalreporter.write_line(f"{what:<44} {diff:>14.3e} {rel:>10.2e}")


@pytest.fixture(scope="session", params=["auto", "xla"])
def conv_impl(request):
    """The convolution a parity test builds the model with (``vgg_flax.create(name, conv=...)``):
    "auto" (oneDNN on this CPU) and "xla" (``lax.conv_general_dilated``, what GPUs and TPUs run)."""
    return request.param
