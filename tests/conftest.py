"""Shared fixtures. Expensive things (torchvision models, converted weights) are session-scoped."""
import os

import pytest

# Several CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def pytest_terminal_summary(terminalreporter):
    """The parity table (variant, size, max abs and relative diff) of this run."""
    import sys
    module = sys.modules.get("test_parity")
    rows = getattr(module, "PARITY_TABLE", [])
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
