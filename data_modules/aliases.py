"""Old module paths of moved modules, kept as aliases: configs saved before a move name classes by their old path
(`data_modules.slide_bags.SlideBagDataModule`), and a resumed or compared run must still resolve them.

`alias_modules(package, moved)` serves `package.<old>` as the module now at `package.<new>`: the same module object,
imported on first use, so classes compare equal and nothing heavy loads before it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Mapping

__all__ = ["alias_modules"]


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in self.moved else None

    def create_module(self, spec):
        return importlib.import_module(self.moved[spec.name])

    def exec_module(self, module) -> None:
        """Nothing to run: the module was imported under its own name."""


def alias_modules(package: str, moved: Mapping[str, str]) -> None:
    """Serve each `package.<old>` of `moved` (old -> new, both relative to `package`) as `package.<new>`."""
    sys.meta_path.append(_Alias({f"{package}.{old}": f"{package}.{new}" for old, new in moved.items()}))
