"""Every test sees 8 simulated CPU devices (set before JAX is imported).

Compiled programs go to JAX's persistent compilation cache (shared by the test processes,
their xdist workers and the train.py / sample.py subprocesses they start, which inherit the
environment): many tests compile the same train step or sampler, and a cache hit loads it
instead of compiling it again. It changes what is compiled when, not what runs."""

import os
import pathlib
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(tempfile.gettempdir()) / "dlm-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def root():
    return ROOT
