"""deepmarc_jax: partially supervised instance segmentation (Deep-MARC / Deep-MAC) in JAX."""
