"""One process of the two-process resume test: 4 simulated CPU devices, gloo collectives, video data (each host
packs its own slice), 4 steps straight, then the same 4 steps stopped after 2 and resumed; writes the losses."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, data_dir, tokenizer, root, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from configs import tiny_train  # noqa: E402

from stts_jax.train.trainer import train  # noqa: E402

cfg = tiny_train.get_config("none")
# examples of 97, 98 or 100 tokens: two fit a 196-token row or not depending on which, so the hosts, packing their
# own shuffled slices, consume different numbers of examples and their iterator states diverge
cfg.data.update(kind="video", path=data_dir, tokenizer=tokenizer, num_frames=4, videos_per_batch=16, rows=8,
                seq_len=196)
cfg.train.update(steps=4, log_every=1, ckpt_every=2)
cfg.mesh.update(data=-1, fsdp=1, tensor=1)
straight = train(cfg, os.path.join(root, "straight"))
first = train(cfg, os.path.join(root, "resumed"), stop_after=2)
rest = train(cfg, os.path.join(root, "resumed"))
with open(out, "w") as f:
    json.dump({"straight": {r["step"]: r["loss"] for r in straight},
               "resumed": {r["step"]: r["loss"] for r in first + rest}}, f)
