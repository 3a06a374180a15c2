"""Pruned vs unpruned, side by side in one process: XLA FLOPs / bytes / memory, and wall-clock.

  python launch/benchmark.py --config=configs/bench_cpu.py --frames=16,32,64 --csv=bench.csv --png=bench.png
  python launch/benchmark.py --config=configs/molmo2_4b.py --frames=128 --ratios=0,0.5 --flops_only

For every frame count (one batch row: one video of T frames + a question; row layout FrameLayout.videos(T))
and prune ratio it lowers and compiles the
unpruned model (STTS off) and the pruned one (scorer, the config's execution mode) and reports, as
pruned/unpruned ratios:
  * FLOPs and bytes of the jitted forward (split ViT incl. scorer+selection+packing / adapter / LLM) and of
    the training step (value_and_grad of LM + aux loss), from XLA's cost analysis. The packed forward is
    lowered without its overflow fallback, because XLA's cost of a lax.cond is the max of its branches;
    `cond` columns show the cost with the fallback compiled in;
  * peak memory (temp + arguments + outputs) from the compiled memory analysis;
  * median wall-clock over --repeats runs after warm-up (block_until_ready), prefill and train step,
    with the real (fallback-guarded) program;
  * "meas/pred": measured speedup / FLOP-predicted speedup; "pack%": selection + packing time as a share of
    the pruned ViT time.
No weights are allocated with --flops_only (abstract parameters), so Molmo2-4B shapes lower on a laptop.

--peer: ours against transformers' PyTorch Molmo2 (the `test` extra), side by side in one process, on the same
weights (our random model exported by `export_hf`, loaded by `Molmo2ForConditionalGeneration.from_pretrained`)
and the same inputs (the video as transformers' processor lays it out: flat frames, `video_token_pooling`,
`video_grids`, `mm_token_type_ids`), logits checked equal first. Rounds interleave the three programs
(transformers unpruned, ours unpruned, ours STTS at 0.5, or the largest --ratios given) so machine noise hits all alike;
prints median forward and train-step times, the ratios, and achieved GFLOP/s (our XLA FLOP count / time: the
unpruned model for ours and transformers, the packed path without its fallback for STTS) against a float32
matmul measured in the same process, and which path the pruned ViT took (a keep pattern that does not fit
the packed rows runs the masked fallback, at about the unpruned ViT's cost):

  OMP_WAIT_POLICY=PASSIVE python launch/benchmark.py --peer --frames=16,32,64 --csv=peer.csv
"""

import csv
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's OpenMP threads must not spin into JAX's time (--peer)
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from stts_jax import cli, geometry
from stts_jax.config import validate_model_config
from stts_jax.data.processor import random_video_prompt
from stts_jax.estimate import counted_flops
from stts_jax.geometry import grid_size, tokens_per_frame
from stts_jax.model.vlm import Molmo2VLM, attention_mask, total_loss
from stts_jax.stts import selection, token_packing
from stts_jax.train import sharding

_CONFIG = cli.config("configs/bench_cpu.py", "Benchmark config file.")
_FRAMES = cli.frames([16, 32, 64, 128])
_RATIOS = cli.ratios([0.0, 0.3, 0.5, 0.8])
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs after compilation.")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "Only lower/compile: FLOPs, bytes, memory (no weights).")
_TRAIN = flags.DEFINE_bool("train", True, "Also measure the training step.")
_PIECES = flags.DEFINE_bool("pieces", True, "Also compile the ViT / adapter / LLM pieces (FLOP split, ViT and "
                             "packing times); --nopieces saves compilations on a GPU.")
_COND_COST = flags.DEFINE_bool("cond_cost", True, "Also compile the fallback-guarded pruned forward for its (cond) FLOPs.")
_CSV = flags.DEFINE_string("csv", None, "Write the table as CSV here.")
_PNG = flags.DEFINE_string("png", None, "Write a plot (speedup vs frames, one line per ratio) here.")
_PEER = flags.DEFINE_bool("peer", False, "Ours (unpruned, STTS) vs transformers' PyTorch Molmo2 on the same weights "
                          "and inputs (needs the `test` extra: torch + transformers).")


def make_batch(cfg, frames: int, question_len: int, seed: int = 0) -> dict:
    """Returns a batch-major host batch of one row: one video of `frames` frames (pixel_values [1, T, N, P];
    W*T placeholders, W*T - K with STTS) and a question."""
    rng = np.random.default_rng(seed)
    ids = random_video_prompt(cfg, rng, frames)
    ids += [int(x) for x in rng.integers(0, min(cfg.llm.vocab_size, 1000), size=question_len)]
    length = len(ids)
    loss_mask = np.zeros((1, length), np.int32)
    loss_mask[0, length - question_len - 1: length - 1] = 1
    pixels = rng.uniform(-1, 1, size=(1, frames, geometry.patches_per_frame(cfg), geometry.patch_dim(cfg)))
    return dict(
        input_ids=np.array([ids], np.int32), segment_ids=np.ones((1, length), np.int32),
        positions=np.arange(length, dtype=np.int32)[None], pixel_values=pixels.astype(np.float32),
        targets=np.roll(np.array([ids], np.int32), -1, axis=1), loss_mask=loss_mask)


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class Subject:
    """One model variant with its jitted pieces: forward, train step, ViT, adapter, LLM."""

    def __init__(self, cfg, layout, flops_only: bool, seed: int):
        validate_model_config(cfg)
        self.cfg, self.layout = cfg, layout
        make = lambda: Molmo2VLM(cfg, rngs=nnx.Rngs(seed))
        model = nnx.eval_shape(make) if flops_only else make()
        self.graphdef, self.state = nnx.split(model)
        self.pruned = cfg.stts.method != "none"

    def model(self, state, fallback=True):
        m = nnx.merge(self.graphdef, state)
        m.pack_fallback = fallback
        return m

    def fns(self, fallback: bool):
        layout = self.layout
        fwd = lambda state, batch: self.model(state, fallback)(batch, layout)

        def train(state, batch):
            return jax.value_and_grad(lambda st: total_loss(self.model(st, fallback), batch, layout)[0])(state)

        def vit(state, pixels):  # pixels [B, F, N, P], every slot real
            mask = jnp.ones(pixels.shape[:2], bool)
            features, rows, _ = self.model(state, fallback).vision_features(pixels, mask, layout)
            return features, rows  # [B, F*N, C], [B, T_kept] or None

        adapter = lambda state, features, pool: self.model(state).adapter(features, pool)

        def llm(state, embeddings, batch):
            ids = batch["input_ids"]
            m = self.model(state)
            vision = jnp.isin(ids, jnp.asarray(m.vision_layout_ids, jnp.int32))
            return m.llm(embeddings, batch["positions"], attention_mask(batch["segment_ids"], vision))

        return dict(fwd=fwd, train=train, vit=vit, adapter=adapter, llm=llm)


def cost(fn, *args) -> dict:
    """Returns FLOPs, bytes accessed and peak memory of fn compiled for args (abstract is fine)."""
    return compile_cost(fn, *args)[1]


def compile_cost(fn, *args):
    """Returns (the compiled fn, its cost dict as `cost`); the executable also runs on concrete args.

    FLOPs count every attention tile (`counted_flops`); bytes are the compiled program's, whose loops XLA
    counts once (a lower bound where attention is tiled)."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.cost_analysis() or {}
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    return compiled, dict(flops=counted_flops(fn, *args), bytes=float(analysis.get("bytes accessed", 0.0)),
                          mem=peak)


def measure_costs(subject: Subject, batch: dict) -> tuple[dict, dict]:
    """Returns (the cost analysis of the forward, its pieces and the train step; the compiled programs that
    measure_times can reuse: the unpruned ones, whose costed and timed programs are the same)."""
    state = abstract(subject.state)
    b = abstract(batch)
    fns = subject.fns(fallback=not subject.pruned)  # packed path alone (see module docstring)
    reuse = {}
    fwd, fwd_cost = compile_cost(fns["fwd"], state, b)
    out = {f"fwd_{k}": v for k, v in fwd_cost.items()}
    if not subject.pruned:
        reuse["fwd"] = fwd
        out["fwd_cond_flops"] = out["fwd_flops"]
    elif _COND_COST.value:
        out["fwd_cond_flops"] = cost(subject.fns(fallback=True)["fwd"], state, b)["flops"]
    if _TRAIN.value:
        train, train_cost = compile_cost(fns["train"], state, b)
        out.update({f"train_{k}": v for k, v in train_cost.items()})
        if not subject.pruned:
            reuse["train"] = train
    if not _PIECES.value:
        return out, reuse
    features, rows = jax.eval_shape(fns["vit"], state, b["pixel_values"])
    out["vit_flops"] = cost(fns["vit"], state, b["pixel_values"])["flops"]
    window = subject.cfg.adapter.pool_size ** 2
    frames = b["pixel_values"].shape[1]
    # the model's pooling indices: [F*W, S] shared by the rows unpruned, [B, T_kept, S] with STTS
    pool_shape = (frames * tokens_per_frame(subject.cfg), window) if rows is None else (*rows.shape, window)
    pool = jax.ShapeDtypeStruct(pool_shape, jnp.int32)
    out["adapter_flops"] = cost(fns["adapter"], state, features, pool)["flops"]
    length = b["input_ids"].shape[1]
    emb = jax.ShapeDtypeStruct((1, length, subject.cfg.llm.hidden_size), jnp.dtype(subject.cfg.dtype))
    out["llm_flops"] = cost(fns["llm"], state, emb, b)["flops"]
    return out, reuse


def median_time(fn, *args) -> float:
    """Returns the median wall-clock seconds of fn(*args) after warm-up."""
    for _ in range(_WARMUP.value):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_times(subject: Subject, batch: dict, reuse: dict | None = None) -> dict:
    """Returns median seconds of the forward, ViT, train step and selection + packing on one device."""
    fns = subject.fns(fallback=True)
    reuse = reuse or {}
    batch = sharding.to_global(batch, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    out = dict(fwd_s=median_time(reuse.get("fwd") or jax.jit(fns["fwd"]), subject.state, batch))
    if _PIECES.value:
        vit = jax.jit(fns["vit"])
        out["vit_s"] = median_time(vit, subject.state, batch["pixel_values"])
    if _TRAIN.value:
        out["train_s"] = median_time(reuse.get("train") or jax.jit(fns["train"]), subject.state, batch)
    if subject.pruned and _PIECES.value:
        out["pack_s"] = median_time(jax.jit(selection_and_packing(subject)), batch["pixel_values"])
    return out


def selection_and_packing(subject: Subject):
    """Returns a function timing what pruning adds around the blocks: top-k, plan, pack, unpack x2."""
    cfg, layout = subject.cfg, subject.layout
    grid, pool, w = grid_size(cfg), cfg.adapter.pool_size, tokens_per_frame(cfg)
    st = cfg.stts
    rows = token_packing.packed_row_budget(geometry.row_vision_tokens(cfg, layout), w, st.pack_slack)

    def run(pixels):  # [B, F, N, P]
        b, f = pixels.shape[:2]
        x = jnp.broadcast_to(pixels[..., :1], (b, f, grid * grid, cfg.vit.hidden_size))
        scores = jnp.mean(pixels, axis=-1)[..., :w]  # [B, F, W]
        keep = selection.select_windows(scores, layout, ratio=st.prune_ratio, prune_from_frame=st.prune_from_frame)
        plan = token_packing.plan_packing(keep, rows)
        packed, mask = token_packing.pack_tokens(x, plan, grid, pool)
        outs = [token_packing.unpack_tokens(packed + i, plan, f, grid, pool) for i in range(len(cfg.adapter.feature_layers))]
        return outs, mask.sum()

    return run


def peak_bytes() -> int | None:
    """Returns the device's peak allocated bytes so far (None where the backend keeps no statistics, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def fmt_absolute(r: dict) -> str:
    """Returns one row's absolute numbers: times (ms), compiled peaks and device peak (GiB), elapsed (s)."""
    gib = lambda x: f"{x / 2**30:.2f}" if x else "-"
    ms = lambda x: f"{1e3 * x:.1f}" if x else "-"
    g = r.get
    return (f"{r['frames']} {r['ratio']:.1f} | {ms(g('unpruned_fwd_s'))} / {ms(g('pruned_fwd_s'))} | "
            f"{ms(g('unpruned_train_s'))} / {ms(g('pruned_train_s'))} | {gib(g('unpruned_fwd_mem'))} / "
            f"{gib(g('pruned_fwd_mem'))}, {gib(g('unpruned_train_mem'))} / {gib(g('pruned_train_mem'))} | "
            f"{gib(g('device_peak_bytes'))} | {r['elapsed_s']:.0f}")


def fmt_ratio(a, b):
    return f"{a / b:.3f}" if a is not None and b else "-"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    base = cfg.model
    print(f"# jax {jax.__version__}, dtype={base.dtype}, param_dtype={base.param_dtype}, remat={base.get('remat', False)}")
    print(f"# device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); config {_CONFIG.value.get('model').vit.hidden_size}-wide ViT, "
          f"{base.vit.num_layers} blocks, {grid_size(base)}x{grid_size(base)} patches, {tokens_per_frame(base)} windows/frame; "
          f"execution={base.stts.execution}, prune_at={base.stts.prune_at}")
    if _PEER.value:
        run_peer(cfg)
        return
    rows = []
    start = time.perf_counter()
    for frames in _FRAMES.value:
        layout = geometry.FrameLayout.videos(frames)  # one row: one video of `frames` frames
        unpruned_cfg = base.copy_and_resolve_references()
        unpruned_cfg.stts.method = "none"
        unpruned = Subject(unpruned_cfg, layout, _FLOPS_ONLY.value, cfg.seed)
        ubatch = make_batch(unpruned_cfg, frames, cfg.question_len)
        ucost, ureuse = measure_costs(unpruned, ubatch)
        utime = {} if _FLOPS_ONLY.value else measure_times(unpruned, ubatch, ureuse)
        del ureuse
        for ratio in _RATIOS.value:
            pcfg = base.copy_and_resolve_references()
            pcfg.stts.method = "scorer"
            pcfg.stts.prune_ratio = ratio
            pruned = Subject(pcfg, layout, _FLOPS_ONLY.value, cfg.seed)
            pbatch = make_batch(pcfg, frames, cfg.question_len)
            pcost, _ = measure_costs(pruned, pbatch)
            row = dict(frames=frames, ratio=ratio, seq_len=pbatch["input_ids"].shape[1],
                       **{f"unpruned_{k}": v for k, v in ucost.items()}, **{f"pruned_{k}": v for k, v in pcost.items()})
            if not _FLOPS_ONLY.value:
                ptime = measure_times(pruned, pbatch)
                row.update({f"unpruned_{k}": v for k, v in utime.items()})
                row.update({f"pruned_{k}": v for k, v in ptime.items()})
            row["device_peak_bytes"] = peak_bytes()
            row["elapsed_s"] = time.perf_counter() - start
            rows.append(row)
            print_row(row, header=len(rows) == 1)
            print(f"#   {fmt_absolute(row)}", flush=True)
            if _CSV.value:  # after every row, so a run stopped early keeps what it measured
                write_csv(rows, _CSV.value)
    print("# absolute: frames ratio | fwd ms unpruned/pruned | train ms unpruned/pruned | compiled peak GiB "
          "fwd unpruned/pruned, train unpruned/pruned | device peak GiB so far | elapsed s")
    for r in rows:
        print(f"#   {fmt_absolute(r)}")
    if _CSV.value:
        print(f"# wrote {_CSV.value}")
    if _PNG.value and not _FLOPS_ONLY.value:
        plot(rows, _PNG.value)


def hf_inputs(cfg, batch: dict, vision_ids) -> dict:
    """Returns transformers' Molmo2 inputs for our one-row, one-video batch: the frames flat, the video's
    pooling windows and grid, mm_token_type_ids 1 on the vision layout tokens, and labels for our loss mask."""
    import torch

    ids = np.asarray(batch["input_ids"])
    frames = batch["pixel_values"].shape[1]
    grid, pool = grid_size(cfg), cfg.adapter.pool_size
    labels = np.full(ids.shape, -100, np.int64)
    where = np.nonzero(np.asarray(batch["loss_mask"])[0])[0]
    labels[0, where + 1] = ids[0, where + 1]  # transformers shifts labels itself
    return dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.ones(ids.shape, dtype=torch.int64),
                mm_token_type_ids=torch.from_numpy(np.isin(ids, vision_ids).astype(np.int64)),
                pixel_values_videos=torch.from_numpy(np.asarray(batch["pixel_values"][0], np.float32)),
                video_token_pooling=torch.from_numpy(geometry.video_pooling_indices(frames, grid, pool)),
                video_grids=torch.tensor([[frames, -(-grid // pool), -(-grid // pool)]]),
                labels=torch.from_numpy(labels))


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Returns the best float32 [n, n] @ [n, n] GFLOP/s of jax on this device: the attainable peak."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def run_peer(cfg) -> list[dict]:
    """Ours vs transformers' Molmo2 (see the module docstring); returns the table rows."""
    import tempfile

    import torch
    from transformers import Molmo2ForConditionalGeneration

    from stts_jax.interop.hf_export import export_hf

    ratio = max(_RATIOS.value) if _RATIOS.present else 0.5
    peak = matmul_gflops()
    print(f"# {jax.devices()[0].device_kind}: jax float32 matmul {peak:.1f} GFLOP/s (the attainable peak below); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for frames in _FRAMES.value:
        base = cfg.model.copy_and_resolve_references()
        base.stts.method = "none"
        layout = geometry.FrameLayout.videos(frames)
        ours = Subject(base, layout, False, cfg.seed)
        sts = cfg.model.copy_and_resolve_references()
        sts.stts.update(method="scorer", prune_ratio=ratio)
        pruned = Subject(sts, layout, False, cfg.seed)  # the same base weights (the scorer is created last)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(nnx.merge(ours.graphdef, ours.state), base, tmp)
            hf = Molmo2ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        batch = make_batch(base, frames, cfg.question_len)
        pbatch = make_batch(sts, frames, cfg.question_len)  # the same text and frames, fewer placeholders
        inputs = hf_inputs(base, batch, ours.model(ours.state).vision_layout_ids)
        one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        dev, pdev = sharding.to_global(batch, one), sharding.to_global(pbatch, one)
        fwd_u, fwd_p = jax.jit(ours.fns(True)["fwd"]), jax.jit(pruned.fns(True)["fwd"])
        train_u, train_p = jax.jit(ours.fns(True)["train"]), jax.jit(pruned.fns(True)["train"])
        no_labels = {k: v for k, v in inputs.items() if k != "labels"}

        def hf_fwd():
            with torch.inference_mode():
                return hf(**no_labels).logits

        def hf_train():
            hf.zero_grad(set_to_none=True)
            loss = hf(**inputs).loss
            loss.backward()
            return loss

        ref = hf_fwd().numpy()
        got = np.asarray(fwd_u(ours.state, dev))
        diff = float(np.abs(got - ref).max())
        if not diff <= 1e-4 * max(1.0, float(np.abs(ref).max())):
            raise SystemExit(f"ours and transformers disagree at {frames} frames: max |logits diff| {diff:.2e}")
        flops = dict(fwd=counted_flops(ours.fns(True)["fwd"], ours.state, dev),
                     fwd_p=counted_flops(pruned.fns(False)["fwd"], pruned.state, pdev))  # packed path (no cond)
        programs = dict(hf_fwd=hf_fwd, fwd=lambda: fwd_u(ours.state, dev), fwd_p=lambda: fwd_p(pruned.state, pdev))
        if _TRAIN.value:
            flops.update(train=counted_flops(ours.fns(True)["train"], ours.state, dev),
                         train_p=counted_flops(pruned.fns(False)["train"], pruned.state, pdev))
            programs.update(hf_train=hf_train, train=lambda: train_u(ours.state, dev),
                            train_p=lambda: train_p(pruned.state, pdev))
        for fn in programs.values():  # compile + warm up
            for _ in range(1 + _WARMUP.value):
                jax.block_until_ready(fn())
        times = {name: [] for name in programs}
        for _ in range(_REPEATS.value):  # interleaved rounds
            for name, fn in programs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        row = dict(frames=frames, ratio=ratio, logits_diff=diff, matmul_gflops=peak, repeats=_REPEATS.value,
                   packed=packed_path_taken(pruned, pdev),
                   **{f"{k}_s": v for k, v in med.items()}, **{f"{k}_flops": v for k, v in flops.items()})
        rows.append(row)
        print_peer_row(row, header=len(rows) == 1)
        if _CSV.value:
            write_csv(rows, _CSV.value)
        del hf
    return rows


def packed_path_taken(subject: Subject, batch: dict) -> bool:
    """Returns whether the pruned forward ran its packed path on `batch` (False: the keep pattern did not fit
    the packed rows, and the masked fallback ran, at about the unpruned ViT's cost)."""
    cfg, layout = subject.cfg, subject.layout

    def overflow(state, pixels):
        mask = jnp.ones(pixels.shape[:2], bool)
        keep = subject.model(state).vision_features(pixels, mask, layout)[2]["keep"]
        rows = token_packing.packed_row_budget(geometry.row_vision_tokens(cfg, layout), tokens_per_frame(cfg), cfg.stts.pack_slack)
        return token_packing.plan_packing(keep, rows).overflow.any()

    return not bool(jax.jit(overflow)(subject.state, batch["pixel_values"]))


def print_peer_row(r: dict, header: bool) -> None:
    """Prints one --peer row: medians (ms), speed relative to transformers unpruned, GFLOP/s."""
    if header:
        print("frames | kind  | transformers ms | ours ms | ours STTS ms | ours / tf | STTS / tf | STTS / ours | "
              "ours GFLOP/s (% of matmul) | tf GFLOP/s | STTS GFLOP/s | max |logits diff| | STTS path")
    for kind in ("fwd", "train"):
        if f"{kind}_s" not in r:
            continue
        tf, u, p = r[f"hf_{kind}_s"], r[f"{kind}_s"], r[f"{kind}_p_s"]
        gf = lambda flops, t: flops / t / 1e9
        print(f"{r['frames']:>6} | {kind:<5} | {1e3 * tf:>15.1f} | {1e3 * u:>7.1f} | {1e3 * p:>12.1f} | "
              f"{tf / u:>8.2f}x | {tf / p:>8.2f}x | {u / p:>10.2f}x | "
              f"{gf(r[f'{kind}_flops'], u):>8.1f} ({100 * gf(r[f'{kind}_flops'], u) / r['matmul_gflops']:.0f}%) | "
              f"{gf(r[f'{kind}_flops'], tf):>10.1f} | {gf(r[f'{kind}_p_flops'], p):>12.1f} | {r['logits_diff']:.1e} | "
              f"{'packed' if r['packed'] else 'masked fallback'}",
              flush=True)


COLUMNS = ["frames", "ratio", "fwd FLOPs", "(cond)", "ViT", "adapter", "LLM", "train FLOPs", "bytes", "mem",
           "fwd speedup", "meas/pred", "train speedup", "meas/pred", "pack%"]


def print_row(r: dict, header: bool) -> None:
    """Prints one table row of pruned/unpruned ratios (speedups = unpruned time / pruned time)."""
    if header:
        print("  ".join(f"{c:>11}" for c in COLUMNS))
    u = lambda k: r.get(f"unpruned_{k}")
    p = lambda k: r.get(f"pruned_{k}")
    cells = [str(r["frames"]), f"{r['ratio']:.1f}", fmt_ratio(p("fwd_flops"), u("fwd_flops")),
             fmt_ratio(p("fwd_cond_flops"), u("fwd_flops")), fmt_ratio(p("vit_flops"), u("vit_flops")),
             fmt_ratio(p("adapter_flops"), u("adapter_flops")), fmt_ratio(p("llm_flops"), u("llm_flops")),
             fmt_ratio(p("train_flops") or 0, u("train_flops") or 0), fmt_ratio(p("fwd_bytes"), u("fwd_bytes")),
             fmt_ratio(p("fwd_mem"), u("fwd_mem"))]
    for kind in ("fwd", "train"):
        if u(f"{kind}_s") and p(f"{kind}_s"):
            speedup = u(f"{kind}_s") / p(f"{kind}_s")
            predicted = u(f"{kind}_flops") / p(f"{kind}_flops")
            cells += [f"{speedup:.2f}x", f"{speedup / predicted:.2f}"]
        else:
            cells += ["-", "-"]
    cells.append(f"{100 * p('pack_s') / p('vit_s'):.1f}" if p("pack_s") else "-")
    print("  ".join(f"{c:>11}" for c in cells), flush=True)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: pip install -e '.[bench]' for --png")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for ratio in sorted({r["ratio"] for r in rows}):
        sel = [r for r in rows if r["ratio"] == ratio]
        frames = [r["frames"] for r in sel]
        line, = ax.plot(frames, [r["unpruned_fwd_s"] / r["pruned_fwd_s"] for r in sel], marker="o",
                        label=f"ratio {ratio:.1f} measured")
        ax.plot(frames, [r["unpruned_fwd_flops"] / r["pruned_fwd_flops"] for r in sel], linestyle="--",
                color=line.get_color(), label=f"ratio {ratio:.1f} FLOP-predicted")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("frames per video")
    ax.set_ylabel("prefill speedup (unpruned / pruned)")
    ax.set_title(f"STTS speedup on {jax.devices()[0].platform}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


if __name__ == "__main__":
    app.run(main)
