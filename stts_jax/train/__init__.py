"""Training: mesh and sharding rules (more to come: state, step, checkpoint, metrics, evaluate)."""
