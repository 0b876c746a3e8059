"""qjax.experiments: calibration, outlier methods, decomposition, finetuning, the runner."""
