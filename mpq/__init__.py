"""mpq: post-training quantization toolchain for Hugging Face causal LMs."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, **kwargs):
    """Load an mpq artifact as a runnable transformers model (see :func:`mpq.loader.load`)."""
    from mpq.loader import load as _load

    return _load(path, **kwargs)
