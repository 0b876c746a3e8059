"""qjax.data: corpora (embedded Austen, WikiText-2, C4, PTB, local files), tokenizers, token windows."""

from qjax.data.text import austen, calibration_windows, load_text, windows
from qjax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_gguf

__all__ = ["ByteTokenizer", "HFTokenizer", "austen", "calibration_windows", "load_text", "load_tokenizer", "tokenizer_from_gguf", "windows"]
