"""Distillation methods, one module each; importing this package registers them all.

Every public module here is imported (pkgutil auto-discovery), so a new method only needs a new
file with a ``@register_method("name")`` class.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
