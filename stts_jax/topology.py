"""TPU slice shapes, pure Python (no jax): the topology of a slice of N chips, gcloud's accelerator type and GKE's
node labels. Shared by launch/estimate.py (the compiled topology) and launch/tpu/jobset.py (the GKE manifest): one
slice shape for both (estimate's --chips counts all slices' chips, jobset's --chips one slice's)."""

from __future__ import annotations

TOPOLOGY_DIMS = {"v5p": 3, "v4": 3, "v5e": 2, "v6e": 2}  # 3-D torus or 2-D slices
GENERATIONS = tuple(TOPOLOGY_DIMS)
# GKE node label cloud.google.com/gke-tpu-accelerator per generation
GKE_ACCELERATOR = {"v5p": "tpu-v5p-slice", "v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                   "v6e": "tpu-v6e-slice"}
CHIPS_PER_HOST = 4  # multi-host slices of every generation here: 4 chips per TPU VM host


def topology_name(tpu: str, chips: int) -> str:
    """Returns the topology of a slice of `chips` chips: power-of-two sides as even as possible, ascending, sides of
    1 last (v5p: 4 -> 2x2x1, 8 -> 2x2x2, 64 -> 4x4x4, 256 -> 4x8x8; v5e/v6e: 8 -> 2x4, 256 -> 16x16)."""
    if tpu not in TOPOLOGY_DIMS:
        raise ValueError(f"TPU generation {tpu!r}: choose one of {GENERATIONS}")
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: TPU slices here are powers of two")
    sides = [1] * TOPOLOGY_DIMS[tpu]
    for i in range(chips.bit_length() - 1):
        sides[i % len(sides)] *= 2
    sides = sorted(s for s in sides if s > 1) + [s for s in sides if s == 1]
    return f"{tpu}:" + "x".join(map(str, sides))


def accelerator_type(tpu: str, chips: int) -> str:
    """Returns gcloud's accelerator type of a slice (v5p and v4 count 2 cores per chip): v5p 64 -> v5p-128.
    (launch/tpu/create.sh --tpu/--chips mirrors this mapping in bash.)"""
    topology_name(tpu, chips)  # refuses what is not a slice
    if TOPOLOGY_DIMS[tpu] == 3 and chips < 4:
        raise ValueError(f"{chips} chips: the smallest {tpu} slice has 4 chips ({tpu}-8)")
    return {"v5p": f"v5p-{2 * chips}", "v4": f"v4-{2 * chips}", "v5e": f"v5litepod-{chips}",
            "v6e": f"v6e-{chips}"}[tpu]


def hosts(chips: int) -> int:
    """Returns the TPU VM hosts of a slice of `chips` chips (one process each)."""
    return max(1, chips // CHIPS_PER_HOST)
