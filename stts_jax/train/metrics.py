"""Training metrics: console lines with ETA, a JSONL log, TensorBoard event files, MFU from XLA's FLOPs."""

from __future__ import annotations

import json
import time

import jax

from stts_jax import paths

# Peak dense bf16 FLOP/s per chip, for MFU (device_kind substrings; unknown devices report no MFU).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
              "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops_per_device() -> float:
    """Returns the peak FLOP/s of one local device, or 0 if unknown (CPU)."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), 0.0)


class MetricWriter:
    """Writes one record per log step to stdout, `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, total_steps: int, step_flops: float = 0.0, tokens_per_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.step_flops, self.tokens_per_step = step_flops, tokens_per_step
        self.peak = peak_flops_per_device() * jax.device_count()
        self.jsonl = paths.AppendLog(paths.join(workdir, "metrics.jsonl"), min_interval_s=10.0) if self.enabled \
            else None  # on gs://: the object is rewritten at most every 10 s (and at the end)
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(paths.join(workdir, "tensorboard"))  # gs:// through google-cloud-storage
            except ImportError:
                pass
        self.start = time.perf_counter()

    def write(self, step: int, metrics: dict, step_time: float, steps_done_this_run: int) -> dict:
        """Logs `metrics` (floats) for `step` with throughput and ETA; returns the record."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "step_time_s": step_time}
        if step_time > 0 and self.tokens_per_step:
            record["tokens_per_s"] = self.tokens_per_step / step_time
        if step_time > 0 and self.step_flops and self.peak:
            record["mfu"] = self.step_flops / step_time / self.peak
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(steps_done_this_run, 1) * (self.total_steps - step)
        if self.enabled:
            parts = [f"step {step}/{self.total_steps}"] + [
                f"{k} {v:.4g}" for k, v in record.items() if k not in ("step",)] + [f"ETA {eta:.0f}s"]
            print(" | ".join(parts), flush=True)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in record.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, step)
        return record

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
