"""qjax.kernels: Pallas GPU kernels (interpret mode on CPU)."""
