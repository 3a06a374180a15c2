"""One process of the two-process evaluation test: 4 simulated CPU devices, gloo collectives, `evaluate` on a mesh
of both processes' 8 devices with the parameters restored onto it; writes every prediction it ends with."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, ckpt, data_dir, tok, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from stts_jax.eval import evaluate as ev  # noqa: E402
from stts_jax.interop import params_io  # noqa: E402
from stts_jax.train import sharding  # noqa: E402

mesh = sharding.make_mesh(4, 2, 1)
model = params_io.load_model(ckpt, mesh=mesh)
result = ev.evaluate(model, data_dir, tokenizer=tok, method="scorer", ratio=0.5, frames=8, rows=8, progress=False,
                     mesh=mesh)
with open(out, "w") as f:
    json.dump({"predictions": result.predictions, "count": result.count, "devices": jax.device_count()}, f)
