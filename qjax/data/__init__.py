"""qjax.data: tokenizers, corpora, calibration sampling."""
