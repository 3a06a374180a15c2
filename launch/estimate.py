"""Will it fit, what will a step cost: AOT lowering + compilation of the train step on a simulated pod.

  python launch/estimate.py --config=configs/molmo2_4b_stts.py:scorer --chips=8,64,256 --platform=tpu --tpu=v5p
  python launch/estimate.py --config=configs/molmo2_4b_stts.py:none --config.data.num_frames=128 --csv=est.csv
  python launch/estimate.py --config=configs/tiny_train.py --chips=8 --platform=cpu --keep_batch
  python launch/estimate.py --config=configs/molmo2_4b_stts.py:scorer --config.data.num_frames=64 --program=eval
  python launch/estimate.py --config=configs/molmo2_4b_stts.py:scorer --platform=tpu --chips=64 --slices=2

`--slices=S` (TPU): the chips form S slices of chips/S (a multi-slice topology, `num_slices`); the mesh's data
axis spans the slices over DCN, fsdp and tensor stay inside one (`mesh.slices`, sharding.make_mesh).

`--program=eval` estimates the evaluation forward instead (`stts_jax.estimate.estimate_eval`: the program
launch/eval.py runs per batch, parameters restored onto the mesh, `--videos_per_device` one-video rows per device,
no optimizer state); its FLOPs are the forward's.

For every chip count it builds the trainer's state abstractly (no weights: `nnx.eval_shape`, sharded
ShapeDtypeStructs from the logical-axis rules, the optimizer state's shardings from compiling
`optimizer.init`), lowers and compiles `stts_jax.train.step.make_train_step` for a mesh of simulated devices,
and prints per device: parameter and optimizer bytes (from the sharded abstract arrays), the compiled
program's temporaries (activations for the backward pass, gradients, workspace) and peak (arguments +
outputs - donated aliases + temporaries), and per step: XLA's FLOP count and the step time it implies at
`--peak_tflops` per chip and `--mfu`.

Devices (`--platform`):
  * `tpu`: a TPU topology description (`jax.experimental.topologies`): the real TPU compiler, offline. Needs
    `libtpu` importable (`pip install 'libtpu==0.0.42.*'`, the version jax 0.10.2's `tpu` extra pins; a
    `--target` directory on PYTHONPATH is enough). Memory is then what XLA:TPU plans for that chip.
  * `cpu`: N fake CPU devices (`--xla_force_host_platform_device_count=N`); the CPU compiler plans memory
    differently (no TPU fusion or layout), so its bytes are a rough guide only.
Each chip count runs in its own subprocess (the device count is fixed when jax is imported).

Batch (`--keep_batch` off): one video per row; the micro-batch is `--videos_per_device` videos per
data-parallel device, accumulated up to `--global_batch` videos per step when that divides (else the global
batch is the micro-batch: a per-device batch); seq_len = one video's tokens + `--text_tokens`, rounded up to
128. FLOPs: XLA counts a loop body once, so a step with grad_accum = a is a * (micro-batch step) - (a - 1) *
(optimizer update), both lowered. With `stts.execution=packed` XLA's cost of the `lax.cond` is the max of
its branches; `TFLOP packed` is the step lowered without the masked fallback (the program that runs whenever
the kept windows fit the row budget), and the step time uses it.
"""

import csv
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from stts_jax import cli

_CONFIG = cli.config(lock=False)
_CHIPS = flags.DEFINE_list("chips", ["8", "64", "256"], "Chip counts to estimate (one subprocess each).")
_PLATFORM = flags.DEFINE_enum("platform", "auto", ["auto", "tpu", "cpu"],
                              "Simulated devices: TPU topology (needs libtpu), fake CPU devices, or tpu if available.")
_TPU = flags.DEFINE_enum("tpu", "v5p", ["v5p", "v5e", "v6e"], "TPU generation (--platform=tpu; one device per chip).")
_MESH = flags.DEFINE_string("mesh", "auto", "auto (fsdp as wide as every embed width divides, data over the rest) | "
                            "fsdp (all chips on the fsdp axis) | config | D,F,T (-1 = the rest, F=0 = auto).")
_SLICES = flags.DEFINE_integer("slices", 1, "Multi-slice (--platform=tpu): the chips form this many equal slices "
                               "joined over DCN; the data axis spans them (mesh.slices), e.g. --chips=64 --slices=2 "
                               "is 2 x v5p-64.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 64, "Videos per optimizer step (the paper: 64).")
_VIDEOS_PER_DEVICE = flags.DEFINE_integer("videos_per_device", 1, "Videos per data-parallel device per micro-batch.")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 256, "Question + answer tokens per video (sets seq_len).")
_KEEP_BATCH = flags.DEFINE_bool("keep_batch", False, "Use the config's data/train batch fields as they are.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense bf16 TFLOP/s per chip (default: --tpu's).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed for the step time.")
_PACKED_FLOPS = flags.DEFINE_bool("packed_flops", True, "Also lower the packed path alone (execution=packed).")
_CSV = flags.DEFINE_string("csv", None, "Append the rows to this CSV (header written if new).")
_PROGRAM = flags.DEFINE_enum("program", "train", ["train", "eval"],
                             "train: the train step; eval: the evaluation forward (launch/eval.py's program: "
                             "parameters only, one micro-batch of one-video rows, no accumulation).")
_CHILD = flags.DEFINE_integer("child_chips", 0, "Internal: estimate this chip count in-process, print JSON.")

# bf16 peak TFLOP/s and HBM GiB per chip (public spec sheets)
CHIPS = {"v5p": dict(tflops=459.0, hbm_gib=95.0), "v5e": dict(tflops=197.0, hbm_gib=16.0),
         "v6e": dict(tflops=918.0, hbm_gib=32.0)}
GIB = 1024 ** 3


def mesh_axes(spec: str, cfg, chips: int) -> tuple[int, int, int]:
    """Returns (data, fsdp, tensor) from --mesh, one -1 axis resolved to the remaining chips; fsdp 0 = auto
    (resolved by sharding.make_mesh from the model's embed widths, data = the rest)."""
    if spec == "auto":
        return (-1, 0, 1)
    if spec == "fsdp":
        axes = [1, -1, 1]
    elif spec == "config":
        axes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    else:
        try:
            axes = [int(p) for p in spec.split(",")]
        except ValueError:
            axes = []
        if len(axes) != 3:
            raise app.UsageError(f"--mesh={spec!r}: expected fsdp, config or D,F,T (e.g. 2,-1,4)")
    if axes.count(-1) > 1:
        raise app.UsageError(f"--mesh={spec!r}: at most one axis may be -1")
    if axes[1] == 0:  # auto fsdp: make_mesh resolves it
        if chips % axes[2]:
            raise app.UsageError(f"--mesh={spec!r}: {chips} chips do not divide by tensor={axes[2]}")
        return (-1, 0, axes[2])
    if -1 in axes:
        rest = -axes[0] * axes[1] * axes[2]
        if chips % rest:
            raise app.UsageError(f"--mesh={spec!r}: {chips} chips do not divide by {rest}")
        axes[axes.index(-1)] = chips // rest
    if axes[0] * axes[1] * axes[2] != chips:
        raise app.UsageError(f"--mesh={spec!r}: {axes} does not use exactly {chips} chips")
    return tuple(axes)


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def run_child(chips: int) -> dict:
    """Estimates one chip count in this process (jax imported here, after XLA_FLAGS is set)."""
    import jax

    from stts_jax.config import validate_model_config
    from stts_jax import estimate, topology
    from stts_jax.train import sharding
    from stts_jax.train.trainer import model_embed_dims

    cfg = _CONFIG.value
    validate_model_config(cfg.model)
    if _PLATFORM.value == "tpu":
        from jax.experimental import topologies

        per_slice = topology.topology_name(_TPU.value, chips // _SLICES.value)
        multi = {"num_slices": _SLICES.value} if _SLICES.value > 1 else {}
        devices = topologies.get_topology_desc(per_slice, "tpu", **multi).devices
        kind = devices[0].device_kind + (f" x {_SLICES.value} slices ({per_slice})" if _SLICES.value > 1 else "")
    else:
        devices = jax.devices()
        kind = f"{len(devices)} simulated CPU devices"
    if len(devices) != chips:
        raise RuntimeError(f"asked for {chips} devices, got {len(devices)}")
    data, fsdp, tensor = mesh_axes(_MESH.value, cfg, chips)
    embed_dims = model_embed_dims(cfg.model) if fsdp == 0 else ()
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices, embed_dims=embed_dims, slices=_SLICES.value)
    evaluating = _PROGRAM.value == "eval"
    if not _KEEP_BATCH.value:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        cfg = estimate.scale_batch(cfg, dp, global_batch=dp * _VIDEOS_PER_DEVICE.value if evaluating
                                   else _GLOBAL_BATCH.value, videos_per_device=_VIDEOS_PER_DEVICE.value,
                                   text_tokens=_TEXT_TOKENS.value)
    if evaluating:
        from stts_jax.eval.evaluate import eval_seq_len

        # the row length evaluate() packs one example into (pruned with STTS), not the training row
        cfg.data.seq_len = eval_seq_len(cfg.model, cfg.data.num_frames, cfg.model.stts.method,
                                        cfg.model.stts.prune_ratio)
        est = estimate.estimate_eval(cfg, mesh)
    else:
        est = estimate.estimate_step(cfg, mesh, packed_flops=_PACKED_FLOPS.value)
    st = cfg.model.stts
    return dict(
        est.__dict__, device=kind, frames=cfg.data.num_frames, method=st.method,
        execution=st.execution if st.method != "none" else "-", remat=bool(cfg.model.get("remat", False)),
        videos_per_micro=cfg.data.videos_per_batch, grad_accum=cfg.train.grad_accum,
        global_videos=cfg.data.videos_per_batch * cfg.train.grad_accum, seq_len=cfg.data.seq_len,
        program=_PROGRAM.value, slices=_SLICES.value)


def spawn(chips: int) -> dict:
    """Runs this script for one chip count in a fresh interpreter; returns its JSON result."""
    env = dict(os.environ)
    if _PLATFORM.value == "cpu":
        flags_ = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
        env["XLA_FLAGS"] = f"{flags_} --xla_force_host_platform_device_count={chips}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # never look for a real accelerator; the TPU topology needs none
    argv, skip = [], False
    for arg in sys.argv[1:]:  # drop the flags the parent owns (both --flag=value and --flag value forms)
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--chips", "--csv", "--platform"):
            skip = "=" not in arg
        else:
            argv.append(arg)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--platform={_PLATFORM.value}",
           f"--child_chips={chips}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ESTIMATE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"estimate for {chips} chips failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("ESTIMATE "):])


def add_derived(row: dict, peak_tflops: float, mfu: float, hbm_gib: float | None) -> dict:
    """Returns row with the derived columns: step FLOPs, step time at peak x MFU, fits in HBM."""
    from stts_jax.estimate import step_seconds

    flops = row["flops_step"]
    run_flops = row["flops_packed_step"] or flops
    row.update(peak_tflops=peak_tflops, mfu=mfu, step_s=step_seconds(run_flops, row["chips"], peak_tflops * 1e12, mfu),
               hbm_gib=hbm_gib, fits=None)
    if row["compile_error"]:  # XLA:TPU refused it: does not fit
        row["fits"] = False
    elif hbm_gib:
        row["fits"] = row["peak_bytes"] <= hbm_gib * GIB
    return row


COLUMNS = [("frames", "frames", "{}"), ("method", "STTS", "{}"), ("chips", "chips", "{}"), ("mesh", "mesh", "{}"),
           ("batch", "videos", "{}"), ("seq_len", "seq", "{}"), ("params_gib", "params", "{:.1f}"),
           ("opt_gib", "opt", "{:.1f}"), ("temp_gib", "temp", "{}"), ("peak_gib", "peak", "{}"),
           ("fits", "fits", "{}"), ("tflop", "TFLOP", "{:.0f}"), ("tflop_packed", "TFLOP packed", "{}"),
           ("step_s", "step s", "{:.2f}"), ("compile_s", "compile s", "{:.0f}")]


def gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def table_cells(row: dict) -> dict:
    mesh = "x".join(row["mesh"].split(" (")[0].replace("data=", "").replace("fsdp=", "").replace("tensor=", "")
                    .split(" x "))
    if row.get("slices", 1) > 1:
        mesh = f"{row['slices']} slices, {mesh}"
    return dict(row, mesh=mesh, batch=f"{row['videos_per_micro']}x{row['grad_accum']}",
                params_gib=row["params_bytes"] / GIB, opt_gib=row["opt_bytes"] / GIB,
                temp_gib=gib(row["temp_bytes"]) + ("*" if row["compile_error"] else ""), peak_gib=gib(row["peak_bytes"]),
                tflop=row["flops_step"] / 1e12,
                tflop_packed=f"{row['flops_packed_step'] / 1e12:.0f}" if row["flops_packed_step"] else "-",
                fits={True: "yes", False: "NO", None: "-"}[row["fits"]])


def print_weak_scaling(rows: list[dict]) -> None:
    """Prints temporaries per device at each chip count relative to the first (weak scaling: goal <= 1.10)."""
    base = rows[0]
    if len(rows) < 2 or not base["temp_bytes"]:
        return
    for row in rows[1:]:
        if row["temp_bytes"]:
            print(f"# weak scaling: temporaries per device {gib(row['temp_bytes'])} GiB at {row['chips']} chips vs "
                  f"{gib(base['temp_bytes'])} GiB at {base['chips']}: ratio {row['temp_bytes'] / base['temp_bytes']:.3f}"
                  f" ({row['videos_per_micro']} vs {base['videos_per_micro']} videos per micro-batch)")


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (e.g. --config=configs/molmo2_4b_stts.py:scorer)")
    if _CHILD.value:
        result = run_child(_CHILD.value)
        print("ESTIMATE " + json.dumps(result), flush=True)
        return
    try:
        chip_counts = [int(c) for c in _CHIPS.value]
    except ValueError:
        raise app.UsageError(f"--chips={','.join(_CHIPS.value)}: expected integers like 8,64,256") from None
    for chips in chip_counts:
        data, fsdp, _ = mesh_axes(_MESH.value, _CONFIG.value, chips)  # refuse a bad --mesh before any subprocess
        if _SLICES.value < 1 or chips % _SLICES.value:
            raise app.UsageError(f"--slices={_SLICES.value} must be >= 1 and divide --chips ({chips})")
        if fsdp != 0 and data % _SLICES.value:
            raise app.UsageError(f"--mesh={_MESH.value}: data={data} on {chips} chips is not a multiple of "
                                 f"--slices={_SLICES.value} (the data axis spans the slices)")
        if _PLATFORM.value == "tpu" and (chips < 1 or chips & (chips - 1)):
            raise app.UsageError(f"--chips: {chips} is not a power of two (TPU slice topologies)")
    if _PLATFORM.value == "auto":
        flags.FLAGS.platform = "tpu" if libtpu_available() else "cpu"
    elif _PLATFORM.value == "tpu" and not libtpu_available():
        raise app.UsageError("--platform=tpu needs libtpu: pip install 'libtpu==0.0.42.*' (or --platform=cpu)")
    if _SLICES.value > 1 and _PLATFORM.value != "tpu":
        raise app.UsageError(f"--slices={_SLICES.value} needs --platform=tpu (a multi-slice TPU topology; fake CPU "
                             "devices of one process form one slice)")
    peak = _PEAK.value or CHIPS[_TPU.value]["tflops"]
    hbm = CHIPS[_TPU.value]["hbm_gib"] if _PLATFORM.value == "tpu" else None
    print("# temp* = temporaries XLA:TPU said it needs when it refused to compile (does not fit)")
    print(f"# {_PLATFORM.value}: {'TPU ' + _TPU.value + ' topology' if _PLATFORM.value == 'tpu' else 'fake CPU devices'}; "
          f"step time at {peak:g} TFLOP/s per chip x MFU {_MFU.value:g}; bytes are per device (GiB)", flush=True)
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    rows = []
    for chips in chip_counts:
        t0 = time.perf_counter()
        row = add_derived(spawn(chips), peak, _MFU.value, hbm)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        cells = table_cells(row)
        print("| " + " | ".join(fmt.format(cells[key]) for key, _, fmt in COLUMNS) + " |", flush=True)
    print_weak_scaling(rows)
    if _CSV.value:
        new = not os.path.exists(_CSV.value)
        with open(_CSV.value, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(rows[0]), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"# appended {len(rows)} rows to {_CSV.value}")


if __name__ == "__main__":
    app.run(main)
