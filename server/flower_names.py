"""The Flower names a fedreid module is written against, imported and checked at once.

fedreid pins flwr 1.39 and reaches into a few of its modules (the SuperLink's handlers, the
SuperNode's loop, the CLI's Control API client). Each such module lists every name it touches;
this checks the list against the installed Flower, so that another release fails at start-up,
naming what is missing and which of our modules to update, instead of mid-run."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable, Mapping


def import_flower_names(api: Mapping[str, Iterable[str]], owner: str) -> dict[str, ModuleType]:
    """The Flower modules named in ``api``, once each has every name listed for it; otherwise a
    RuntimeError naming what is missing and ``owner``, the fedreid module written against them."""
    modules = {name: importlib.import_module(name) for name in api}
    for name, members in api.items():
        missing = [member for member in members if not hasattr(modules[name], member)]
        if missing:
            raise RuntimeError(f"the installed Flower's {name} lacks {missing}; pin flwr==1.39.* or update {owner}")
    return modules
