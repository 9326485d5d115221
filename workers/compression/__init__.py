"""The compression engine: mixed-precision quantization and structured pruning of catalog models.

Runs as `python -m workers.compression` (see __main__.py). Imports no Django.
"""


class BadInput(ValueError):
    """Input the user must fix (unknown model, bad ratio, wrong upload): the CLI exits 2 on it."""


# The catalog's names, here so that input can be checked before torch is imported (models.CATALOG agrees).
MODEL_NAMES = ("digits-cnn", "minilm-l6", "resnet50", "bert-base", "llama-1b")
