"""Deprecated names, kept for one release: a module `__getattr__` that warns and forwards."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn(old: str, advice: str) -> None:
    """One DeprecationWarning line: `old` is deprecated, `advice` says what to use.

    Args:
      old: the deprecated spelling, as a user wrote it (e.g. "esacl_jax.keep_top").
      advice: what to write instead (e.g. "use esacl_jax.masks.top_mask").
    """
    warnings.warn(f"{old} is deprecated: {advice}", DeprecationWarning,
                  stacklevel=_caller_level())


def _caller_level() -> int:
    """The `stacklevel` (for a `warnings.warn` in `warn`) of the first frame outside the
    library: the user's line, whichever library function the deprecated spelling went through
    (the harness counts as a user)."""
    frame, level = sys._getframe(2), 2  # warn's caller
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("esacl_jax.") or module.startswith("esacl_jax.harness"):
            break
        frame, level = frame.f_back, level + 1
    return level


def forwarding_getattr(module: str, moved: Mapping[str, tuple[str, str]]
                       ) -> Callable[[str], Any]:
    """A module `__getattr__` that serves each old name of `moved` with a DeprecationWarning.

    Args:
      module: the module's `__name__` (for the messages).
      moved: `{old_name: ("package.module:new_name", advice)}`; an empty advice says "use
        package.module.new_name".

    Returns:
      The `__getattr__` function to assign in the module.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, advice = moved[name]
        where, new = target.split(":")
        warnings.warn(f"{module}.{name} is deprecated: {advice or f'use {where}.{new}'}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), new)

    return __getattr__
