"""``mpq bench``: inference speed and memory of a model, an mpq artifact or a GGUF file, beside
float and int8 weight-only baselines of its source.

- :mod:`mpq.bench.configs`: what is measured (:class:`Config` rows, :class:`Settings`), built and
  checked from the command's inputs; the int8 baseline artifact.
- :mod:`mpq.bench.measure`: one configuration measured in the current process (transformers /
  mpq.load); :mod:`mpq.bench.gguf` the same through llama.cpp's Python binding.
- :mod:`mpq.bench.runner`: each configuration in its own child process (so its peak RSS is its
  own), rows back as dicts; :mod:`mpq.bench.report` the table.
"""
