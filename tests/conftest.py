"""Shared fixtures. Expensive things (torchvision models, converted weights) are session-scoped."""
import os

# Several CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
