"""fastiml: contrastive image manipulation localization with fused pixel-contrast kernels.

Submodules are imported lazily so that the pure-Python parts (data, metrics, models) work
even before the compiled extension is built; ``fastiml.ops`` loads it on first use.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "reference", "losses", "models", "methods", "data", "metrics", "engine", "cli",
               "copy_move")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fastiml' has no attribute {name!r}")
