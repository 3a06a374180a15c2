"""The README's main job end to end in --quick mode: data -> base -> fine-tunes -> evaluation -> table + CSV.

A smoke test of the wiring (a few steps on a few clips; the accuracies are not results): every stage runs for
every seed, the table lists each run with the vision-token counts the method implies and the spread over seeds,
results.csv / eval.csv follow their schemas, two seeds give different runs and a seed run again reproduces itself.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *flags):
    cmd = [sys.executable, "launch/demo.py", "--quick", f"--workdir={out}", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_demo_quick_runs_every_stage_for_every_seed(tmp_path):
    out = tmp_path / "demo"
    stdout = run_demo(out, "--runs=stts_0.5,random_0.5", "--seeds=2")
    assert "ETA" in stdout and "=== [" in stdout and "seed 1: train" in stdout
    table = (out / "table.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(lines) >= {"base", "stts_0.5", "stts_0.5 @16 frames", "random_0.5", "evs_0.5"}, table
    assert "36 / 72" in lines["stts_0.5"] and "36 / 72" in lines["random_0.5"] and "72 / 72" in lines["base"]
    assert "36 / 72" in lines["evs_0.5"] and "training-free EVS baseline" in table  # on the base: no unpruned run
    assert "72 / 144" in lines["stts_0.5 @16 frames"]
    assert lines["stts_0.5"].rstrip(" |").endswith("x")  # speedup over the base run (no unpruned fine-tune here)
    assert "(mean ± sd, 2 seeds)" in table and " ± " in lines["stts_0.5"]
    # the paired comparisons the claims rest on, with how many seeds each holds for
    assert {"stts_0.5 - base", "stts_0.5 - random_0.5", "stts_0.5 - evs_0.5"} <= set(lines), table
    assert lines["stts_0.5 - random_0.5"].rstrip(" |").endswith("/ 2")

    rows = read_csv(out / "eval.csv")
    from stts_jax.eval.evaluate import CSV_FIELDS

    assert rows and list(rows[0]) == ["seed", *CSV_FIELDS]
    assert {(r["seed"], r["run"], r["method"], r["kind"]) for r in rows} >= {
        (s, run, method, kind) for s in "01" for run, method, kind in [
            ("stts_0.5", "scorer", "all"), ("random_0.5", "random", "flash_colour"), ("base", "none", "all"),
            ("evs_0.5", "evs", "all")]}
    for r in rows:
        assert int(r["count"]) == 16 and 0 <= float(r["accuracy"]) <= 1
    results = read_csv(out / "results.csv")
    assert {(r["run"], r["seed"]) for r in results} == {
        (run, s) for run in lines if run in ("base", "stts_0.5", "stts_0.5 @16 frames", "random_0.5", "evs_0.5")
        for s in "01"}
    # the table's mean is the mean of the per-seed rows
    acc = {r["seed"]: 100 * float(r["accuracy"]) for r in results if r["run"] == "random_0.5"}
    assert f"{(acc['0'] + acc['1']) / 2:.1f} ± " in lines["random_0.5"]

    # two seeds: two different runs (initialisation, data order, random-pruning draws)
    for run in ("base", "random_0.5"):
        assert losses(out / "runs" / "seed0" / run) != losses(out / "runs" / "seed1" / run), run

    # one seed run again (same machine, same clips): the same losses and the same accuracies, also when the run
    # is stopped by SIGTERM during its base (the demo exits naming the run; the same command resumes it)
    again = tmp_path / "again"
    shutil.copytree(out / "data", again / "data")  # the stage is reused: same clips, no second write
    flags = ["--runs=random_0.5", "--seeds=1"]
    proc = subprocess.Popen([sys.executable, "launch/demo.py", "--quick", f"--workdir={again}", *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # one pipe: none fills unread
    base_started = False
    for line in proc.stdout:  # the base's first logged step (of 6): the trainer's SIGTERM handler is in place
        base_started = base_started or "train unpruned base model" in line
        if base_started and line.startswith("step 1/6 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "stopped during" in rest and "seed0/base" in rest, rest[-2000:]
    assert not (again / "runs" / "seed0" / "random_0.5").exists()  # nothing after the stopped stage ran
    stdout = run_demo(again, *flags)
    assert "data: reusing" in stdout and "One seed:" in stdout
    for run in ("base", "random_0.5"):
        assert losses(again / "runs" / "seed0" / run) == losses(out / "runs" / "seed0" / run), run
    first = {(r["run"], r["seed"]): r["accuracy"] for r in results}
    for r in read_csv(again / "results.csv"):
        assert r["accuracy"] == first[r["run"], r["seed"]], r
