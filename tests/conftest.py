"""Shared pytest set-up: GPU-only tests (marker `gpu`) skip cleanly where JAX sees no GPU."""

import os

# Before jax is imported: `pytest -n 8` runs eight processes on one GPU, and each would otherwise take 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Eight CPU devices in this process, for the tensor-parallel tests (test_parallel.py); everything else runs on the
# first. Only while JAX starts its backends: processes the tests start (servers, the chat) keep the usual one.
_XLA_FLAGS = os.environ.get("XLA_FLAGS")
if "xla_force_host_platform_device_count" not in (_XLA_FLAGS or ""):
    os.environ["XLA_FLAGS"] = ((_XLA_FLAGS or "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"  # (starts the backends)
if _XLA_FLAGS is None:
    os.environ.pop("XLA_FLAGS")
else:
    os.environ["XLA_FLAGS"] = _XLA_FLAGS
# Pallas kernels run in interpret mode wherever there is no GPU (CI, laptops).
INTERPRET = not ON_GPU


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (JAX backend is %s)" % jax.default_backend())
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
