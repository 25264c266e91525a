"""Device meshes, multi-host start-up and the sharding rules that place params, batches and activations."""
