"""The shared entry-point flags (stts_jax/cli.py): parsed to numbers, bad values refused naming the flag."""

import os
import subprocess
import sys

import pytest

from stts_jax.cli import _NumberListParser

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_number_lists_parse_and_refuse():
    frames = _NumberListParser(int, 1, None)
    assert frames.parse("16,32, 64") == [16, 32, 64] and frames.parse([8]) == [8]
    with pytest.raises(ValueError, match="expected comma-separated ints"):
        frames.parse("16,abc")
    with pytest.raises(ValueError, match="0 is outside >= 1"):
        frames.parse("0,16")
    ratios = _NumberListParser(float, 0.0, 1.0)
    assert ratios.parse("0,0.5") == [0.0, 0.5]
    with pytest.raises(ValueError, match=r"1.0 is outside \[0.0, 1.0\)"):
        ratios.parse("0.5,1")


@pytest.mark.parametrize("script,args,message", [
    ("aux_memory.py", ["--frames=16,x"], "flag --frames=16,x: expected comma-separated ints"),
    ("benchmark.py", ["--ratios=0.5,1.2"], r"flag --ratios=0.5,1.2: 1.2 is outside [0.0, 1.0)"),
    ("predict.py", ["--frames=0"], "flag --frames=0"),
])
def test_launch_scripts_refuse_bad_shared_flags_before_any_work(script, args, message):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_a_refused_input_ends_the_script_with_its_message(tmp_path):
    """cli.refusals: exit status 2, the script's name and the library's message, no traceback."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"), f"--params={tmp_path / 'none'}",
                          f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"export: {tmp_path / 'none'} is not a directory" in out.stderr


def test_shared_flags_belong_to_the_script_in_its_short_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--helpshort"],
                         capture_output=True, text=True, timeout=120)
    for flag in ("--config:", "--frames:", "--ratios:"):
        assert flag in out.stdout + out.stderr, (flag, out.stdout[-2000:])
