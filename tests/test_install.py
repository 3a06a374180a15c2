"""Install metadata: ranges in pyproject.toml, the exact tested set in constraints.txt, and a dependency resolution
for Python 3.12 (Colab's Python) from the package index, without installing, although this machine runs 3.11.

The resolution tests ask the real index (pip's dry run with --python-version); they are skipped, with the reason in
the summary, only when the index cannot be reached at all. pip 23's dry run does not apply Requires-Python to the
target Python, so the wheel's own Requires-Python is checked separately."""

import email
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATOR_EXTRAS = ("tpu", "cuda", "cuda12")  # jax plugins: not installed in CI, so not in the lock
# Dependencies published as source only: pip cannot build them for another Python, so their (pure-Python) wheels
# are built here first and offered with --find-links.
SDIST_ONLY = ("promise",)
# Colab and most GPU images are glibc >= 2.35 on x86_64; pip 23 matches a --platform tag exactly, so list them all.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def lock() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            assert canonicalize_name(name) not in pins, f"constraints.txt pins {name} twice"
            pins[canonicalize_name(name)] = version
    return pins


def requirements(extras=None) -> list[Requirement]:
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    names = [e for e in optional if e not in ACCELERATOR_EXTRAS] if extras is None else extras
    return [Requirement(r) for r in project["dependencies"]] + [Requirement(r) for e in names for r in optional[e]]


def test_lock_pins_every_dependency_inside_its_range():
    pins = lock()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject.toml: {req})"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]} outside pyproject.toml's range {req.specifier}"
    # The lock is what CI installs: it is this venv's set for every package the project asks for.
    for req in requirements(["test", "export"]):
        assert version(req.name) == pins[canonicalize_name(req.name)], f"{req.name}: installed != constraints.txt"


def test_metadata_ranges_not_pins():
    project = pyproject()["project"]
    assert SpecifierSet(project["requires-python"]).contains("3.11") and \
        SpecifierSet(project["requires-python"]).contains("3.12")
    for req in requirements(list(project["optional-dependencies"])):
        exact = [s for s in req.specifier if s.operator in ("==", "===")]
        assert not exact, f"pyproject.toml pins {req}: give a range (the exact set lives in constraints.txt)"
        assert any(s.operator == ">=" for s in req.specifier), f"{req}: give the tested lower bound"
    # One torch range that both extras accept, capped where newer releases download a multi-GB CUDA build.
    torch = {str(r.specifier) for r in requirements(["test", "export"]) if r.name == "torch"}
    assert len(torch) == 1 and not SpecifierSet(torch.pop()).contains("2.15.0")
    extras = project["optional-dependencies"]
    assert [Requirement(r).extras for e in ACCELERATOR_EXTRAS for r in extras[e]] == [{"tpu"}, {"cuda13"}, {"cuda12"}]


def index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Builds the project's wheel from a copy of the tree (with an optional edit of pyproject.toml) and the wheels
    of the source-only dependencies; returns build(edit) -> (wheel path, find-links dir)."""
    if not index_reachable():
        pytest.skip("the package index (pypi.org) cannot be reached: dependency resolution not checked")
    links = tmp_path_factory.mktemp("links")
    pins = lock()
    for name in SDIST_ONLY:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", f"{name}=={pins[name]}",
                        "-w", str(links)], check=True)

    def build(edit=lambda text: text):
        src = tmp_path_factory.mktemp("src")
        shutil.copytree(os.path.join(ROOT, "stts_jax"), src / "stts_jax",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(ROOT, "README.md"), src / "README.md")
        text = open(os.path.join(ROOT, "pyproject.toml")).read()
        (src / "pyproject.toml").write_text(edit(text))
        out = tmp_path_factory.mktemp("wheel")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
                       check=True)
        (wheel,) = out.glob("stts_jax-*.whl")
        return wheel, links

    return build


def resolve(wheel, links, extras: str, python: str, target) -> subprocess.CompletedProcess:
    """pip's resolver for another Python, from the index, downloading metadata only (nothing is installed)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--target", str(target),
           "--find-links", str(links), "--report", str(target / "report.json")]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return subprocess.run(cmd + [f"{wheel}[{extras}]"], capture_output=True, text=True,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def resolved(report_path) -> dict[str, str]:
    with open(report_path) as f:
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(f)["install"]}


def wheel_accepts_python(wheel, python: str) -> bool:
    """The wheel's own Requires-Python. pip 23's `install --python-version` does not check it (only `download`,
    which would fetch every wheel), so the tests read it from the wheel's metadata."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(z.read(name))
    return SpecifierSet(metadata.get("Requires-Python", "")).contains(python)


def test_ranges_resolve_for_python_3_12(wheels, tmp_path):
    wheel, links = wheels()
    assert wheel_accepts_python(wheel, "3.12")
    proc = resolve(wheel, links, "test,export,tpu,cuda", "3.12", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = resolved(tmp_path / "report.json")
    for req in requirements(["test", "export", "tpu", "cuda"]):
        assert canonicalize_name(req.name) in got and req.specifier.contains(got[canonicalize_name(req.name)])
    assert "libtpu" in got and "jax-cuda13-plugin" in got, sorted(got)
    assert got["jax"] == got["jaxlib"], (got["jax"], got["jaxlib"])


def test_python_3_12_refused_when_the_old_python_pin_is_put_back(wheels):
    wheel, _ = wheels(lambda t: re.sub(r'requires-python = "[^"]*"', 'requires-python = ">=3.11,<3.12"', t))
    assert not wheel_accepts_python(wheel, "3.12") and wheel_accepts_python(wheel, "3.11")


def test_install_into_an_environment_that_has_everything_adds_only_the_project(tmp_path):
    """What the notebook's Colab cell relies on: `pip install -e .` next to packages already inside the ranges
    changes none of them (here: this venv, which holds the lock)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(tmp_path / "r.json"),
                           "-e", f"{ROOT}[test,export]"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(resolved(tmp_path / "r.json")) == {"stts-jax"}, proc.stdout[-3000:]


def test_readme_commands_use_the_lock_and_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.startswith("python3.11 -m venv")]
    assert len(commands) == 2 and all("pip install -c constraints.txt" in c for c in commands), commands
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert commands[1] in ci.splitlines(), "`.ci/run` must run exactly the README's test command"
