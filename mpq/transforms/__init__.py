"""Block transforms (``transforms:`` in a recipe): rewrite a decoder block's float weights before
its layers are quantized, keeping the float block's output unchanged (e.g. SmoothQuant).

Importing this package registers the built-in transforms.
"""
from mpq.transforms import awq, smoothquant  # noqa: F401
