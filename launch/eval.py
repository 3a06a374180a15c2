"""Multiple-choice accuracy of trained checkpoints, per question kind, for STTS methods, ratios and frame counts.

  python launch/eval.py --checkpoint=demo_out/runs/seed0/stts_0.5 --data_dir=demo_out/data/tfds \\
      --methods=none,scorer,evs,random --ratios=0.5,0.8 --frames=8,16 [--split=validation] [--csv=eval.csv]
      [--scoring=logits,generate] [--mesh=auto] [--benchmark=videomme]

--checkpoint is a training workdir (its latest Orbax checkpoint) or a params checkpoint; several may be given
(comma-separated). For each, every (method, ratio, frames) setting is evaluated: `none` runs unpruned, `scorer`
keeps the learned top-(1-ratio) windows per frame (needs a checkpoint trained with the scorer), `evs` the windows
that changed most since the previous frame (training-free, any checkpoint), `random` random ones. Each example
is one video + question with lettered options; the prediction is the option whose letter has the largest logit
at the answer position (--scoring=logits), and/or the option the greedily generated answer names
(--scoring=generate, parsed Molmo2-style; unparsed answers count as wrong). For a benchmark prepared by
launch/prepare_benchmark.py the scores users quote are printed per setting (per task, macro, Video-MME by
duration, standard errors clustered by video) and written to a results JSON next to the CSV (--results).
--mesh: `one` device, `auto` (every device: fsdp as wide as the weights divide, data the rest; parameters restored
straight onto it) or data,fsdp,tensor sizes; --rows must divide by data x fsdp. Test-time scaling: --frames larger than the
training's (e.g. 2x frames at ratio 0.5 = the unpruned token budget); --max_fps caps the sampling rate
(Molmo2: 2 fps; scale it with the frames, e.g. 4 for 2x frames of short clips). Prints a table of accuracy and
vision tokens per example side by side, and writes one CSV row per (checkpoint, setting, question kind).
"""

import csv
import io
import json
import os
import time

from absl import app, flags, logging

from stts_jax import cli, paths

_CHECKPOINT = cli.checkpoint(many=True, help="Training workdir(s) or params checkpoint(s).", required=True)
_DATA = flags.DEFINE_string("data_dir", None, "Prepared video_qa tfds dir (launch/prepare_data.py).", required=True)
_SPLIT = flags.DEFINE_string("split", "validation", "Split to evaluate.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: in --data_dir or its parents).")
_METHODS = flags.DEFINE_list("methods", ["none", "scorer", "random"], "STTS methods: none | scorer | evs | random.")
_RATIOS = cli.ratios([0.5], "Prune ratios for scorer / random.")
_FRAMES = cli.frames(None, "Frames per video (default: the checkpoint's training frames).")
_MAX_FPS = flags.DEFINE_float("max_fps", 2.0, "Sampling-rate cap (frames per second of video); 0 = none.")
_ROWS = flags.DEFINE_integer("rows", 8, "Examples per batch.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Evaluate at most this many examples (0 = all).")
_CSV = flags.DEFINE_string("csv", None, "Append the rows to this CSV (written with a header if new).")
_SCORING = flags.DEFINE_list("scoring", ["logits"], "logits (option letter logits) and/or generate (greedy answer).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "--scoring=generate: tokens to generate at most.")
_MESH = flags.DEFINE_string("mesh", "one", "one | auto | data,fsdp,tensor (sizes; -1 = the rest).")
_BENCHMARK = flags.DEFINE_string("benchmark", "", "Benchmark name for the headline score (default: the records').")
_RESULTS = flags.DEFINE_string("results", None, "Results JSON (default: the CSV's path with .json, if --csv).")
_MULTIHOST = cli.multihost("Call jax.distributed.initialize() (TPU pods: run on every host; each reads its share "
                            "of the split, process 0 prints and writes the results).")


def format_table(rows: list[dict]) -> str:
    """Returns a markdown table of the "all" rows: checkpoint, method, ratio, frames, tokens, accuracy per kind."""
    kinds = sorted({r["kind"] for r in rows if r["kind"] != "all"})
    head = ["run", "method", "ratio", "frames", "vision tokens / example", "accuracy"] + kinds
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_setting = {}
    for r in rows:
        by_setting.setdefault((r["run"], r["method"], r["ratio"], r["frames"]), {})[r["kind"]] = r
    for (run, method, ratio, frames), per_kind in by_setting.items():
        a = per_kind["all"]
        cells = [run, method, f"{ratio:g}" if method != "none" else "-", str(frames),
                 f"{a['vision_tokens']} / {a['vision_tokens_unpruned']}", f"{100 * a['accuracy']:.1f}"]
        cells += [f"{100 * per_kind[k]['accuracy']:.1f}" if k in per_kind else "-" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    """Appends rows (evaluate.CSV_FIELDS) to `path`, writing the header if the file is new."""
    from stts_jax.eval.evaluate import CSV_FIELDS

    new = not paths.as_path(path).exists()
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    if new:
        writer.writeheader()
    writer.writerows(rows)
    with paths.AppendLog(path) as log:  # local or gs://
        log.write(buffer.getvalue())


def make_mesh(spec: str, model_cfg):
    """Returns the mesh of --mesh: None for `one`, every device for `auto`, else data,fsdp,tensor sizes."""
    from stts_jax.train import sharding
    from stts_jax.train.trainer import model_embed_dims

    if spec == "one":
        return None
    slices = sharding.slice_count()  # on a multi-slice TPU the data axis spans the slices
    if spec == "auto":
        return sharding.make_mesh(-1, 0, 1, embed_dims=model_embed_dims(model_cfg), slices=slices)
    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise app.UsageError(f"--mesh must be one, auto or three comma-separated ints, got {spec!r}") from None
    try:
        return sharding.make_mesh(data, fsdp, tensor, embed_dims=model_embed_dims(model_cfg) if fsdp == 0 else (),
                                  slices=slices)
    except ValueError as e:
        raise app.UsageError(f"--mesh={spec}: {e}") from None


def load(path: str):
    """Returns the model of a training workdir or params checkpoint (on --mesh), its training frame count, mesh."""
    from stts_jax.interop import params_io

    kinds = ("params", "train")
    mesh = make_mesh(_MESH.value, params_io.checkpoint_model_config(path, kinds))
    found = params_io.load_checkpoint(path, kinds=kinds, mesh=mesh)
    if found.kind == "params":
        return found.model, None, mesh
    logging.info("%s: step %d", path, found.step)
    return found.model, found.train_config.get("data", {}).get("num_frames"), mesh


def main(argv):
    del argv
    jax = cli.start_jax(_MULTIHOST)
    lead = jax.process_index() == 0
    from stts_jax.data.pipeline import find_dataset_dir
    from stts_jax.eval import evaluate as ev

    try:
        find_dataset_dir(_DATA.value)
    except FileNotFoundError as e:
        raise app.UsageError(str(e))
    tokenizer = _TOKENIZER.value
    if tokenizer is None:
        from stts_jax.data.pipeline import find_tokenizer
        import ml_collections

        tokenizer = find_tokenizer(ml_collections.ConfigDict(dict(path=_DATA.value, tokenizer="")))
    ratios = list(_RATIOS.value)
    bad = sorted(set(_SCORING.value) - set(ev.SCORINGS))
    if bad:
        raise app.UsageError(f"--scoring: unknown {bad}; choose from {ev.SCORINGS}")
    from stts_jax.eval import scoring

    rows, results = [], []
    start = time.perf_counter()
    for path in _CHECKPOINT.value:
        model, train_frames, mesh = load(path)
        frames = list(_FRAMES.value) if _FRAMES.value else [train_frames or 8]
        run = os.path.basename(os.path.normpath(path))
        methods = [m for m in _METHODS.value if m != "scorer" or model.scorer is not None]
        for method in sorted(set(_METHODS.value) - set(methods)):
            print(f"{run}: skipping method {method!r} (trained with stts.method={model.cfg.stts.method!r})")
        for method, ratio, t in ev.settings(methods, ratios, frames):
            for how in _SCORING.value:
                result = ev.evaluate(model, _DATA.value, split=_SPLIT.value, tokenizer=tokenizer, method=method,
                                     ratio=ratio, frames=t, rows=_ROWS.value, max_examples=_MAX_EXAMPLES.value,
                                     max_fps=_MAX_FPS.value or None, mesh=mesh, scoring=how,
                                     max_new_tokens=_MAX_NEW.value)
                rows += result.rows(run=run, train_method=model.cfg.stts.method,
                                    train_ratio=model.cfg.stts.prune_ratio if model.cfg.stts.method != "none" else 0.0)
                try:
                    summary = result.summary(_BENCHMARK.value)
                except ValueError as e:  # e.g. a macro-headline benchmark whose records carry no task
                    print(f"{run}: no benchmark scores for {method} ({how}): {e}")
                    summary = None
                results.append(dict(run=run, method=method, ratio=result.ratio, frames=t, scoring=how,
                                    vision_tokens=result.vision_tokens, skipped=result.skipped,
                                    seconds=round(result.seconds, 1), scores=summary, examples=result.examples))
                if not lead:
                    continue
                score = (f"accuracy {100 * result.accuracy():.1f}%" if summary is None else
                         f"headline {100 * summary['headline_accuracy']:.1f}% ({summary['headline']})")
                print(f"{run}: {method} ratio {result.ratio:g} at {t} frames ({how}): {score}, "
                      f"{result.count['all']} examples, {result.skipped} skipped, {result.vision_tokens} vision "
                      f"tokens each, {result.seconds:.0f} s", flush=True)
                if summary is not None:
                    print(scoring.format_summary(summary))
    if not lead:
        return
    print()
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if _CSV.value:
        write_csv(_CSV.value, rows)
        print(f"-> {_CSV.value}")
    results_path = _RESULTS.value or (os.path.splitext(_CSV.value)[0] + ".json" if _CSV.value else None)
    if results_path:
        paths.write_text(results_path, json.dumps(dict(data_dir=_DATA.value, split=_SPLIT.value,
                                                       benchmark=_BENCHMARK.value, results=results),
                                                  indent=1, sort_keys=True))
        print(f"-> {results_path}")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
