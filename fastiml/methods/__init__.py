"""Training methods. Each module of this package that defines ``METHOD`` (a
:class:`~fastiml.methods.base.Method` subclass) is a method, named by ``METHOD.name``: adding a
method is adding one file."""
import importlib
import pkgutil
from typing import Dict, Type

from fastiml.methods.base import Method


def available() -> Dict[str, Type[Method]]:
    """Method name -> class, for every module here that defines METHOD."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "METHOD", None)
        if cls is not None:
            found[cls.name] = cls
    return found


def build(name: str, **options) -> Method:
    """The method called ``name``, configured with ``options``."""
    methods = available()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name](**options)


__all__ = ["Method", "available", "build"]
