"""Quantizers and number formats; importing this package registers the built-in ones."""
