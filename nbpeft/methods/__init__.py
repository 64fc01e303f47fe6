"""PEFT methods: one module per method, each registering itself in ``base``'s registry.

Every module in this package is imported here, so adding a method is adding one file.
"""

import importlib
import pkgutil
import sys
import types

from .base import get_method, methods, register, unregister

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["get_method", "methods", "register", "unregister"]


class _Package(types.ModuleType):
    """``nbpeft.methods()`` lists the methods: the package itself is the function, so no name shadows it."""

    def __call__(self) -> list:
        return methods()


sys.modules[__name__].__class__ = _Package
