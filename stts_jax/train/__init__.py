"""Training: the mesh and sharding rules (sharding), the optimizer (optim), the jitted step (step), the host
input iterator (inputs), Orbax checkpoints (checkpoint), metrics, the workdir lease and the loop (trainer)."""
