"""The README's main job end to end in --quick mode: data -> base -> fine-tunes -> evaluation -> table + CSV.

A smoke test of the wiring (a few steps on a few clips; the accuracies are not results): every stage runs,
the table lists each run with the vision-token counts the method implies, and eval.csv follows the schema
the notebook reads.
"""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "launch/demo.py", "--quick", f"--workdir={out}", "--runs=stts_0.5,random_0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ETA" in proc.stdout and "=== [" in proc.stdout
    table = (out / "table.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(lines) >= {"base", "stts_0.5", "stts_0.5 @16 frames", "random_0.5", "evs_0.5"}, table
    assert "36 / 72" in lines["stts_0.5"] and "36 / 72" in lines["random_0.5"] and "72 / 72" in lines["base"]
    assert "36 / 72" in lines["evs_0.5"] and "training-free EVS baseline" in table  # on the base: no unpruned run
    assert "72 / 144" in lines["stts_0.5 @16 frames"]
    assert lines["stts_0.5"].rstrip(" |").endswith("x")  # speedup over the base run (no unpruned fine-tune here)
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    from stts_jax.train.evaluate import CSV_FIELDS

    assert rows and list(rows[0]) == list(CSV_FIELDS)
    assert {(r["run"], r["method"], r["kind"]) for r in rows} >= {
        ("stts_0.5", "scorer", "all"), ("random_0.5", "random", "flash_colour"), ("base", "none", "all"),
        ("evs_0.5", "evs", "all")}
    for r in rows:
        assert int(r["count"]) == 16 and 0 <= float(r["accuracy"]) <= 1
