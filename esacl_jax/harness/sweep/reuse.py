"""Whether a stored results.json can stand in for a planned run: same config, or not reused.

A stored run is reused only when its config equals the planned one, leaving out the fields that
do not change the computation (`esacl_jax.harness.config.NON_COMPUTATIONAL_FIELDS`) and the
method-specific sections the planned method does not read (from the method registry). A field
only one side has is a difference.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

from esacl_jax.harness.config import NON_COMPUTATIONAL_FIELDS
from esacl_jax.harness.sweep.plan import Outcome, Run, build_config, one_line, plain_config


@functools.lru_cache(maxsize=1)
def _section_readers() -> dict[str, frozenset[str]]:
    from esacl_jax.harness import methods

    return methods.section_readers()


def config_differences(planned: Mapping, stored: Mapping, prefix: str = "") -> list[str]:
    """``"field: stored -> planned"`` for every field whose value differs between two configs.

    A field only one side has is a difference too. `NON_COMPUTATIONAL_FIELDS` at the top level
    and the method-specific sections (`esacl_jax.harness.methods.section_readers`) that the
    planned run's method does not read are never compared.
    """
    diffs = []
    readers = _section_readers() if not prefix else {}
    method = planned.get("method") if not prefix else None
    for key in sorted(planned.keys() | stored.keys()):
        if not prefix and key in NON_COMPUTATIONAL_FIELDS:
            continue
        if key in readers and method not in readers[key]:
            continue
        name = f"{prefix}{key}"
        if key not in stored:
            value = planned[key]
            if isinstance(value, Mapping):  # a whole section: compare each of its fields
                diffs += config_differences(value, {}, f"{name}.")
            else:
                diffs.append(f"{name}: (not recorded) -> {value!r}")
            continue
        if key not in planned:
            diffs.append(f"{name}: {stored[key]!r} -> (not in the config schema)")
            continue
        a, b = planned[key], stored[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += config_differences(a, b, f"{name}.")
        elif a != b:
            diffs.append(f"{name}: {b!r} -> {a!r}")
    return diffs


def check_existing(run: Run, data_dir: str | None) -> Outcome:
    """A skip for a results.json made by the same config, else a failure saying what differs."""
    try:
        stored = json.loads(run.results_path.read_text(encoding="utf-8"))
        planned = plain_config(build_config(run, data_dir))
    except Exception as err:  # noqa: BLE001 - reported as this run's failure
        return Outcome(run, "failed", error=f"cannot reuse {run.results_path}: {one_line(err)}")
    diffs = config_differences(planned, stored.get("config") or {})
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; +{len(diffs) - 4} more" if len(diffs) > 4 else "")
        return Outcome(run, "failed", error=f"{run.results_path} was made with another config "
                       f"({shown}): pass --force to redo it or choose another --out")
    return Outcome.from_metrics(run, "skipped", stored.get("metrics") or {},
                                stored.get("wall_time_s"), stored.get("node"))
