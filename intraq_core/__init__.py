"""IntraQ data-free quantization, in plain PyTorch (no Ray)."""

__version__ = "0.1.0"
