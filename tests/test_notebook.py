"""notebooks/inspect_stts.ipynb runs headless end to end on a tiny trained checkpoint and writes every figure."""

import csv
import itertools
import json
import os
import re
import struct
import sys

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "inspect_stts.ipynb")
FIGURES = ("overlay.png", "scores.png", "kept_per_frame.png", "target_vs_scores.png", "speedup.png",
           "accuracy_vs_ratio.png")
FRAMES = 8


def tiny_workdir(path: str) -> str:
    """Trains the tiny STTS config for 2 steps on random data.

    1 device, 1 video per batch and `masked` execution (no packed lax.cond): the train step compiles in about a
    third of the time; the notebook runs the model's own vision path, whichever the execution mode.
    """
    from configs import tiny_train

    from stts_jax.train.trainer import train

    cfg = tiny_train.get_config("scorer")
    cfg.data.update(kind="random", videos_per_batch=1, rows=1)
    cfg.mesh.update(data=1)
    cfg.model.stts.execution = "masked"
    cfg.train.update(steps=2, ckpt_every=1, log_every=1)
    train(cfg, path)
    return path


def write_csv(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


KINDS = ("direction", "which_moved", "flash_count", "appeared_last", "all")


def fake_eval_csv(path: str) -> str:
    """Made-up rows in launch/demo.py's schema (launch/eval.py's plus a seed column; two seeds whose accuracies
    differ by 0.04), only to exercise the plotting code (not real results)."""
    rows = []
    for method, ratios in (("none", [0.0]), ("scorer", [0.3, 0.5, 0.8]), ("random", [0.3, 0.5, 0.8])):
        for frames, ratio, kind, seed in itertools.product((4, 8), ratios, KINDS, (0, 1)):
            acc = 0.8 - (0.1 if method == "scorer" else 0.3) * ratio + 0.01 * frames + 0.04 * seed - 0.02
            count = 100 if kind != "all" else 400
            unpruned = 9 * frames
            rows.append(dict(seed=seed, run="stts_0.5" if method != "none" else "none", train_method=method,
                             train_ratio=0.5 if method != "none" else 0.0, method=method, ratio=ratio,
                             frames=frames, kind=kind, correct=round(acc * count), count=count,
                             accuracy=round(acc * count) / count,
                             vision_tokens=unpruned - int(9 * ratio * (frames - 0)),
                             vision_tokens_unpruned=unpruned))
    return write_csv(path, rows)


def fake_bench_csv(path: str) -> str:
    """Made-up rows with launch/benchmark.py --csv columns (the ones the notebook plots), not real timings."""
    rows = []
    for frames in (16, 32, 64):
        for ratio in (0.0, 0.5, 0.8):
            row = dict(frames=frames, ratio=ratio, seq_len=100 + 81 * frames)
            for kind, base in (("fwd", 0.01), ("train", 0.03)):
                u = base * frames
                row[f"unpruned_{kind}_s"] = u
                row[f"pruned_{kind}_s"] = u / (1 + ratio * (1 + frames / 64))
                row[f"unpruned_{kind}_flops"] = 1e9 * frames
                row[f"pruned_{kind}_flops"] = 1e9 * frames * (1 - 0.9 * ratio)
            rows.append(row)
    return write_csv(path, rows)


def synthetic_mp4(path: str) -> str:
    from stts_jax.data.synthetic import ClipSpec, make_clip, write_mp4

    spec = ClipSpec(size=64, num_frames=32, fps=8)
    frames, _, _ = make_clip(3, spec)
    return write_mp4(path, frames, fps=spec.fps)


def png_size(path: str) -> tuple[int, int]:
    """Returns (width, height) of a PNG, checking its signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def python_kernel(tmp_path, monkeypatch) -> str:
    """Installs a `python3` kernelspec running this interpreter (first on JUPYTER_PATH), with the test's JAX env."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    env = {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS") if k in os.environ}
    spec = dict(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="stts-jax test kernel", language="python", env=env)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def test_notebook_runs_and_writes_every_figure(tmp_path, monkeypatch):
    workdir = tiny_workdir(str(tmp_path / "run"))
    out = tmp_path / "figures"
    params = dict(CHECKPOINT=workdir, VIDEO=synthetic_mp4(str(tmp_path / "clip.mp4")), FRAMES=FRAMES,
                  EVAL_CSV=fake_eval_csv(str(tmp_path / "eval.csv")),
                  BENCH_CSV=fake_bench_csv(str(tmp_path / "bench.csv")), SAVE_DIR=str(out))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook cleared"
    original = {}
    exec(tagged[0].source, {}, original)  # plain assignments, every parameter present
    assert set(original) == set(params), original
    tagged[0].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())

    client = nbclient.NotebookClient(nb, kernel_name=python_kernel(tmp_path, monkeypatch), timeout=300,
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()  # raises CellExecutionError on any cell error

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.get("output_type") == "stream")
    assert "training checkpoint, step 2" in text, text[-3000:]
    assert "model scores == direct scorer call: True" in text, text[-3000:]
    # the two seeds' rows are merged: the mean, their sample standard deviation (0.04 / sqrt 2) and the count
    acc = 0.8 - 0.1 * 0.5 + 0.01 * 8
    assert re.search(rf"stts_0.5 +scorer +0.50 +8 +{acc:.3f} +0.028 +2 +400 ", text), text[-3000:]
    for name in FIGURES:
        path = out / name
        assert path.exists(), f"{name} was not written; outputs:\n{text[-3000:]}"
        width, height = png_size(str(path))
        assert 200 <= width <= 5000 and 150 <= height <= 5000, (name, width, height)
        assert path.stat().st_size > 5000, (name, path.stat().st_size)

    import matplotlib.image

    overlay = matplotlib.image.imread(str(out / "overlay.png"))
    assert overlay.ndim == 3 and float(overlay[..., :3].std()) > 0.05, "overlay looks uniform"
