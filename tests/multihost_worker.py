"""One process of the two-process tests: 4 simulated CPU devices, gloo collectives, 3 training steps (8 for the
preemption test)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
variant = sys.argv[5] if len(sys.argv) > 5 else ""
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from configs import tiny_train

from stts_jax.train.trainer import train  # noqa: E402

cfg = tiny_train.get_config("scorer")
cfg.train.update(steps=3, log_every=1, ckpt_every=100)
if variant == "empty_slots":
    cfg.data.update(tiny_train.EMPTY_SLOTS_DATA)
if variant == "preempt":  # the test sends SIGTERM to one process mid-run, then starts both again to resume
    cfg.train.update(steps=8, ckpt_every=100)
cfg.mesh.update(data=-1, fsdp=1, tensor=1)
if variant == "slices":  # each process one slice: data spans the two over the 'DCN' (gloo), fsdp=2 inside each
    cfg.mesh.update(fsdp=2, slices=2)
from stts_jax.train import sharding  # noqa: E402

grids = []  # the multi-slice device grids the trainer's mesh was built from
real_hybrid_grid = sharding.hybrid_grid
sharding.hybrid_grid = lambda *a: grids.append(real_hybrid_grid(*a)) or grids[-1]
records = train(cfg, workdir)
mesh_processes = [[[[d.process_index for d in row] for row in plane] for plane in g.tolist()] for g in grids]
with open(out, "w") as f:
    json.dump({"losses": [r["loss"] for r in records], "devices": jax.device_count(),
               "local": jax.local_device_count(), "mesh_processes": mesh_processes}, f)
