"""The CPU demo: the paper's central table in miniature, from nothing, in one command.

  python launch/demo.py [--workdir=demo_out] [--seeds=N] [--quick]

1. writes the synthetic temporal video-QA set (real h264 mp4s, stts_jax.data.synthetic) and prepares it as
   tfds ArrayRecord shards;
2. trains a small Molmo2-shaped VLM (configs/demo.py) from scratch, unpruned: the "pretrained" base model;
3. fine-tunes the base for the same number of steps five ways (the paper's protocol: STTS is a fine-tuning
   recipe): unpruned, STTS at prune ratio 0.5 and 0.8, random pruning at 0.5 and 0.8;
4. evaluates every run on the validation split (multiple-choice accuracy, stts_jax.eval.evaluate), with
   test-time scaling for the STTS runs (2x frames at the same ratio), and the training-free EVS baseline
   (evs_<ratio>: the unpruned fine-tune pruned at evaluation by frame-to-frame change) at each pruned ratio;
5. prints one table: accuracy (overall and per question kind), vision tokens per example, the train-step time
   (as logged, input included; and the jitted step alone, all runs timed side by side) and the speedup over
   the unpruned fine-tune, then the paired differences the paper's claims rest on (STTS vs unpruned, STTS vs
   random, per seed). Also written to <workdir>/table.md, results.csv (one row per run and seed) and eval.csv
   (per kind, with the seed; the notebook's plots read it).

Seeds are an axis (`--seeds=N`): seed k trains its own base and fine-tunes (its own initialisation, data order
and random-pruning draws; the clips are shared) under <workdir>/runs/seed<k>/, and the table gives each accuracy
as mean ± sample standard deviation over the seeds with every seed's value. One seed (the default) says which
differences are within its sampling error: float rounding differs between machines, so one seed's ordering of
close runs does not carry to another machine.

Every stage prints progress with an ETA; stages already complete in --workdir are reused (the data, finished
runs), and an interrupted run resumes from its last checkpoint. --quick runs a few steps on a few clips (a
smoke test of the whole path, not a result).
"""

import csv
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Where the data, runs and tables go.")
_CLIPS = flags.DEFINE_integer("clips", 3000, "Training clips (each asks every question kind).")
_VAL_CLIPS = flags.DEFINE_integer("validation_clips", 300, "Validation clips.")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 1000, "Steps of the unpruned base model.")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 200, "Fine-tuning steps of each run.")
_RUNS = flags.DEFINE_list("runs", ["unpruned", "stts_0.5", "random_0.5", "stts_0.8", "random_0.8"],
                          "Fine-tuning runs: unpruned | stts_<ratio> | random_<ratio>.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 24 clips, a few steps per run (not a result).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Processes writing the clips.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds (0..N-1): each trains its own base and fine-tunes on "
                              "the same clips; the table shows mean ± spread.", lower_bound=1)

CLIP_FRAMES, EVENT_FRAMES, RADIUS = 32, 5, 12  # 4 s at 8 fps; Molmo2 samples 8 frames (2 fps): every flash is seen
KINDS = ("flash_colour",)


class Progress:
    """Prints stage lines with the elapsed time and an ETA from the planned work units (training steps)."""

    def __init__(self, total_units: float):
        self.start = time.perf_counter()
        self.total, self.done = total_units, 0.0
        self.rate = None  # seconds per unit, measured

    def stage(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        eta = "" if self.rate is None else f", ETA {self.rate * (self.total - self.done) / 60:.1f} min"
        print(f"\n=== [{elapsed / 60:5.1f} min{eta}] {text}", flush=True)

    def advance(self, units: float) -> None:
        self.done += units
        self.rate = (time.perf_counter() - self.start) / max(self.done, 1e-9)

    def skip(self, units: float) -> None:
        """Takes work reused from an earlier run out of the plan (it took no time here: no rate from it)."""
        self.total -= units


def run_config(name: str, base_dir: str | None, steps: int, data_dir: str, quick: bool, seed: int = 0):
    """Returns the training config of run `name` (base | unpruned | stts_<r> | random_<r>) for training seed
    `seed` (initialisation, scorer / random-pruning draws and the data order; the clips are the same)."""
    from configs.demo import get_config

    if name in ("base", "unpruned"):
        arg = "none"
    else:
        method, ratio = name.split("_")
        arg = f"{'scorer' if method == 'stts' else method},r{ratio}"
    cfg = get_config(arg)
    cfg.data.path = data_dir
    cfg.data.shuffle_seed = seed
    cfg.train.seed = seed
    cfg.train.steps = steps
    cfg.train.ckpt_every = max(steps // 2, 1)
    cfg.train.log_every = max(1, min(25, steps // 4))
    if base_dir:  # fine-tuning: a lower LR for every group. The paper gives the scorer 10x the LLM's; here that
        # saturates the sigmoid scorer at 0 within 200 steps (most windows never change: aux target 0), after
        # which its ranking is no better than random, so the scorer gets the same LR as the rest.
        cfg.train.init_from = base_dir
        cfg.optim.update(lr_vit=3e-4, lr_adapter=3e-4, lr_llm=3e-4, lr_scorer=3e-4, warmup_steps=max(1, steps // 10))
    if quick:
        cfg.optim.warmup_steps = 1
    return cfg


def make_data(out: str, progress: Progress, quick: bool) -> str:
    """Writes + prepares the synthetic set under out/ (reused when complete); returns the tfds data dir."""
    from stts_jax.config import tiny_model_config
    from stts_jax.data import synthetic

    tfds_dir = os.path.join(out, "tfds")
    stamp = os.path.join(out, "DONE.json")
    clips, val = (24, 16) if quick else (_CLIPS.value, _VAL_CLIPS.value)
    settings = dict(clips=clips, validation_clips=val, frames=CLIP_FRAMES, event_frames=EVENT_FRAMES,
                    radius=RADIUS, kinds=list(KINDS))
    if os.path.exists(stamp) and json.load(open(stamp)) == settings:
        progress.stage(f"data: reusing {out}")
        return tfds_dir
    progress.stage(f"data: writing {clips} + {val} synthetic clips ({CLIP_FRAMES} frames, h264) to {out}")
    spec = synthetic.ClipSpec(num_frames=CLIP_FRAMES, event_frames=EVENT_FRAMES, object_radius=RADIUS,
                              shuffle_options=False)
    synthetic.write_benchmark(out, clips, spec, validation_clips=val, tokens=dict(tiny_model_config().tokens),
                              workers=_WORKERS.value, progress=True, kinds=KINDS)
    import tensorflow_datasets as tfds

    from stts_jax.data.tfds_builders.video_qa import VideoQa

    tfds.disable_progress_bar()
    builder = VideoQa(data_dir=tfds_dir, on_error="skip", progress=True)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=out))
    if builder.skipped:
        print(f"skipped {len(builder.skipped)} bad videos: {builder.skipped[:3]}")
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return tfds_dir


def step_time(workdir: str) -> float:
    """Returns the median logged train-step time of a run (the first log, which holds compilation, dropped)."""
    times = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            times.append(json.loads(line)["step_time_s"])
    return statistics.median(times[1:] if len(times) > 1 else times)


def compute_step_times(runs: dict, repeats: int) -> dict:
    """Returns {run: (median seconds of its jitted train step on one fixed real batch, XLA's FLOPs of the step)}.

    Every run's trained model and step are compiled first, then timed round-robin (one step of each run per
    round, `repeats` rounds), side by side in this process, so drift in the machine's load hits all alike.
    """
    import jax
    import numpy as np
    from flax import nnx

    from stts_jax.interop import params_io
    from stts_jax.train import inputs, sharding
    from stts_jax.train.optim import make_optimizer
    from stts_jax.train.step import init_state, make_train_step, shardings_of
    from stts_jax.train.trainer import frame_layout, step_flops

    steps = {}
    for name, (cfg, workdir) in runs.items():
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        model = params_io.load_train_checkpoint(workdir)[0]
        with jax.set_mesh(mesh):
            source = inputs.make_input(cfg)
            batch = sharding.to_global(source.next_batches(1), mesh, batch_axis=1)  # [1 micro-batch, rows, ...]
            sharding.shard_model(model, mesh)
            optimizer = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
            graphdef, state = init_state(model, optimizer)
            fn = make_train_step(graphdef, optimizer, frame_layout(cfg), seed=0, state_shardings=shardings_of(state))
            flops = step_flops(fn, state, batch)
            state, metrics = fn(state, batch)  # compile + warm up
            jax.block_until_ready(metrics)
            steps[name] = [fn, state, batch, mesh, flops]
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, entry in steps.items():
            fn, state, batch, mesh, _ = entry
            with jax.set_mesh(mesh):
                start = time.perf_counter()
                state, metrics = fn(state, batch)
                jax.block_until_ready(metrics)
                times[name].append(time.perf_counter() - start)
            entry[1] = state
    return {name: (float(np.median(t)), steps[name][4]) for name, t in times.items()}


def finished(workdir: str, steps: int) -> bool:
    """Returns whether a run's latest checkpoint is its last step."""
    from stts_jax.interop import params_io

    try:
        return os.path.basename(params_io.train_step_dir(workdir)) == str(steps)
    except params_io.ParamsCheckpointError:
        return False


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from stts_jax.interop import params_io
    from stts_jax.eval import evaluate as ev
    from stts_jax.train.trainer import train

    quick = _QUICK.value
    out = os.path.abspath(_WORKDIR.value)
    base_steps, ft_steps = (6, 4) if quick else (_BASE_STEPS.value, _FT_STEPS.value)
    runs, seeds = list(_RUNS.value), list(range(_SEEDS.value))
    for name in runs:
        if name != "unpruned" and not (name.split("_")[0] in ("stts", "random") and name.count("_") == 1):
            raise app.UsageError(f"--runs: unknown run {name!r} (unpruned | stts_<ratio> | random_<ratio>)")
    # work units: training steps (pruned steps are cheaper, counted as 1 anyway); an evaluation and a
    # timed compilation ~ 60 steps each
    evals = len(runs) + 1 + sum(n.startswith("stts_") for n in runs) + len({n.split("_")[1] for n in runs if n != "unpruned"})
    progress = Progress(len(seeds) * (base_steps + ft_steps * len(runs) + 60 * evals) + 60 * (len(runs) + 1))
    os.makedirs(out, exist_ok=True)
    data_dir = make_data(os.path.join(out, "data"), progress, quick)
    tokenizer = os.path.join(out, "data", "tokenizer.json")

    run_dirs = {}  # (seed, run) -> workdir
    for seed in seeds:
        base_dir = os.path.join(out, "runs", f"seed{seed}", "base")
        for name, init, steps in [("base", None, base_steps)] + [(n, base_dir, ft_steps) for n in runs]:
            workdir = run_dirs[seed, name] = os.path.join(out, "runs", f"seed{seed}", name)
            cfg = run_config(name, init, steps, data_dir, quick, seed)
            what = "unpruned base model from scratch" if name == "base" else f"fine-tune from the base: {name}"
            if finished(workdir, steps):
                progress.stage(f"seed {seed}: train {name}: reusing {workdir}")
                progress.skip(steps)
            else:
                progress.stage(f"seed {seed}: train {what} ({steps} steps, {cfg.data.videos_per_batch} videos/step, "
                               f"{cfg.data.seq_len} tokens/row) -> {workdir}")
                train(cfg, workdir)
                if not finished(workdir, steps):  # SIGTERM: the trainer saved its step and returned; stop here too
                    sys.exit(f"stopped during {workdir} (SIGTERM, checkpoint saved): run the same command again to "
                             f"resume from it")
                progress.advance(steps)

    # the model's own step time, side by side (the logged step time above also holds input decoding); seed 0's
    # models: the step's cost does not depend on the seed
    progress.stage("time the train step of every run on one fixed batch, round-robin (input excluded)")
    compute = compute_step_times({n: (run_config(n, None, ft_steps, data_dir, quick), run_dirs[0, n])
                                  for n in ["base"] + runs}, repeats=3 if quick else 20)
    progress.advance(60 * (len(runs) + 1))

    # evaluation: every run with its own method; STTS runs also with 2x frames (test-time scaling)
    # and the training-free EVS baseline on the unpruned fine-tune (the base without one) at every pruned ratio
    rows, results, timed = [], {}, {}  # results: label -> [EvalResult per seed]; timed: label -> its run
    frames = run_config("base", None, 1, data_dir, quick).data.num_frames
    evs_run = "unpruned" if "unpruned" in runs else "base"
    evs_ratios = sorted({float(n.split("_")[1]) for n in runs if n != "unpruned"})
    for seed in seeds:
        for name in ["base"] + runs:
            model = params_io.load_train_checkpoint(run_dirs[seed, name])[0]
            method, ratio = model.cfg.stts.method, model.cfg.stts.prune_ratio
            settings = [(name, method, ratio, frames, 2.0)]
            if method == "scorer":
                settings.append((f"{name} @{2 * frames} frames", method, ratio, 2 * frames, 4.0))
            if name == evs_run:
                settings += [(f"evs_{r:g}", "evs", r, frames, 2.0) for r in evs_ratios]
            for label, m, r, t, fps in settings:
                progress.stage(f"seed {seed}: eval {name}: {m} ratio {r:g} at {t} frames")
                result = ev.evaluate(model, data_dir, tokenizer=tokenizer, method=m, ratio=r, frames=t, max_fps=fps,
                                     seed=seed)
                extra = dict(run=label, train_method=method, train_ratio=ratio if method != "none" else 0.0)
                rows += [dict(row, seed=seed) for row in result.rows(**extra)]
                results.setdefault(label, []).append(result)
                if label == name:  # the run's own setting: its step times
                    timed[label] = name
                progress.advance(60)
    summary = []
    for label, per_seed in results.items():
        name = timed.get(label)
        per_seed_step = [step_time(run_dirs[s, name]) for s in seeds] if name else None
        summary.append(dict(run=label, results=per_seed, step_s_seeds=per_seed_step,
                            step_s=statistics.median(per_seed_step) if name else None,
                            compute_s=compute[name][0] if name else None, flops=compute[name][1] if name else None))
    table = format_table(summary, ft_steps, base_steps, evs_run if evs_ratios else None)
    print("\n" + table, flush=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "eval.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("seed",) + ev.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(result_rows(summary, seeds))
    progress.stage(f"done: {out}/table.md, results.csv, eval.csv")


RESULT_FIELDS = ("run", "seed", "accuracy", "correct", "count", "vision_tokens", "vision_tokens_unpruned",
                 "train_step_s", "model_step_s", "step_flops")


def result_rows(summary: list[dict], seeds: list[int]) -> list[dict]:
    """Returns results.csv's rows: one per (run, seed); the model step and its FLOPs are seed 0's (side by side)."""
    rows = []
    for s in summary:
        for i, (seed, r) in enumerate(zip(seeds, s["results"])):
            rows.append(dict(run=s["run"], seed=seed, accuracy=round(r.accuracy(), 6), correct=r.correct.get("all", 0),
                             count=r.count["all"], vision_tokens=r.vision_tokens,
                             vision_tokens_unpruned=r.vision_tokens_unpruned,
                             train_step_s="" if s["step_s_seeds"] is None else round(s["step_s_seeds"][i], 6),
                             model_step_s="" if s["compute_s"] is None or i else round(s["compute_s"], 6),
                             step_flops="" if s["flops"] is None or i else s["flops"]))
    return rows


def spread_cell(values: list[float], digits: int = 1) -> str:
    """Returns "m" for one value, "m ± sd" (sample standard deviation) for several."""
    m = statistics.fmean(values)
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def comparisons(summary: list[dict]) -> list[tuple[str, str, float | None]]:
    """Returns the (run, reference, bar) pairs the paper's claims rest on: STTS at ratio r within 2 points of
    unpruned or above (bar -2), above random at r (bar 0), against the training-free EVS at r (no bar)."""
    labels = [s["run"] for s in summary]
    ref = "unpruned" if "unpruned" in labels else "base"
    pairs = []
    for label in labels:
        if label.startswith("stts_") and " @" not in label:
            ratio = label.split("_")[1]
            pairs.append((label, ref, -2.0))
            pairs += [(label, f"{other}_{ratio}", bar) for other, bar in (("random", 0.0), ("evs", None))
                      if f"{other}_{ratio}" in labels]
    return pairs


def format_table(summary: list[dict], ft_steps: int, base_steps: int, evs_run: str | None = None) -> str:
    """Returns the demo's markdown table (accuracy as mean ± sd over seeds with each seed's value, per-kind
    accuracy, tokens, step times, speedups), then the paired differences per seed (or, for one seed, which
    differences lie within its sampling error)."""
    kinds = sorted({k for s in summary for r in s["results"] for k in r.count if k != "all"})
    n_seeds = len(summary[0]["results"])
    ref_run = "unpruned" if any(s["run"] == "unpruned" for s in summary) else "base"
    ref = next(s for s in summary if s["run"] == ref_run)
    acc = {s["run"]: [100 * r.accuracy() for r in s["results"]] for s in summary}
    head = ["run", "accuracy %" + (f" (mean ± sd, {n_seeds} seeds)" if n_seeds > 1 else "")]
    head += ["per seed"] if n_seeds > 1 else []
    head += [f"{k} %" for k in kinds] + [
        "vision tokens / example", "train step s (with input)", "speedup", "model step s (compute)", "speedup",
        "step FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def speed(s, key):
        if s[key] is None or s["run"] in ("base", ref_run):
            return "-"
        return f"{ref[key] / s[key]:.2f}x"

    for s in summary:
        r0 = s["results"][0]
        cells = [s["run"], spread_cell(acc[s["run"]])]
        cells += [" / ".join(f"{a:.1f}" for a in acc[s["run"]])] if n_seeds > 1 else []
        cells += [spread_cell([100 * r.accuracy(k) for r in s["results"]]) for k in kinds]
        cells.append(f"{r0.vision_tokens} / {r0.vision_tokens_unpruned}")
        for key in ("step_s", "compute_s"):
            cells += ["-" if s[key] is None else f"{s[key]:.3f}", speed(s, key)]
        cells.append("-" if not s["flops"] or not ref["flops"] else f"{s['flops'] / ref['flops']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    n = r0.count["all"]
    lines.append(f"\n{n} validation questions; base: {base_steps} steps from scratch, each run: {ft_steps} more "
                 f"steps from the base; chance is 25%. Train step (with input): median logged step time of the run, "
                 f"compilation excluded, input decoding included; model step (compute): median of the jitted step "
                 f"on one fixed batch, all runs timed round-robin in one process; speedup: {ref_run} / the run; step FLOPs: "
                 f"XLA's count of the lowered step / {ref_run}'s.")
    if n_seeds > 1:
        lines.append(f"Seeds 0..{n_seeds - 1}: each trains its own base and fine-tunes on the same clips (its own "
                     f"initialisation, data order and pruning draws); ± is the sample standard deviation over seeds; "
                     f"step times are the median over seeds (model step: seed 0's models).")
    if evs_run:
        lines.append(f"evs_<ratio>: the training-free EVS baseline (keep the windows that changed most since the "
                     f"previous frame, STTS's counts and first-frame rule) applied at evaluation to the {evs_run} run, "
                     f"no training.")
    pairs = comparisons(summary)
    if pairs:
        lines += ["", "| comparison (same seed) | difference, points" + (" (mean ± sd)" if n_seeds > 1 else "")
                  + " | per seed | claim | seeds where it holds |", "|---|---|---|---|---|"]
        for run, other, bar in pairs:
            diffs = [a - b for a, b in zip(acc[run], acc[other])]
            claim = "-" if bar is None else (">= -2" if bar < 0 else "> 0")
            holds = "-" if bar is None else f"{sum(d >= bar if bar < 0 else d > bar for d in diffs)} / {n_seeds}"
            lines.append(f"| {run} - {other} | {spread_cell(diffs)} | {' / '.join(f'{d:+.1f}' for d in diffs)} "
                         f"| {claim} | {holds} |")
    if n_seeds == 1:
        p = statistics.fmean(a / 100 for a in acc[ref_run])
        se = 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)
        within = 2 * math.sqrt(2) * se  # two standard errors of a difference of two accuracies
        close = [f"{run} - {other}" for run, other, _ in pairs if abs(acc[run][0] - acc[other][0]) < within]
        lines.append(f"\nOne seed: the binomial standard error of one accuracy here is {se:.1f} points ({n} "
                     f"questions), and training from scratch on another machine or seed moves runs by more than that "
                     f"(the README's 3-seed table gives the spread). Differences under 2·√2·SE = {within:.1f} "
                     f"points"
                     + (f" ({', '.join(close)})" if close else "")
                     + " are not conclusions; run --seeds=3 (or more) for the spread.")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
