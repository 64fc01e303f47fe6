"""PEFT methods: one module per method, each registering itself in ``base``'s registry.

Every module in this package is imported here, so adding a method is adding one file.
"""

import importlib
import pkgutil

from .base import get_method, methods, register, unregister

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["get_method", "methods", "register", "unregister"]
