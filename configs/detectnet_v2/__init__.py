"""DetectNet_v2 experiment configs (`bpnet_jax.detectnet_v2.config` schema)."""
