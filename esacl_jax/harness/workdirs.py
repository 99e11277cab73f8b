"""Where a run writes: a workdir that already holds a finished run of another config is kept.

`experiments.main --workdir=DIR` (and so `make run`) resolves DIR with `resolve_workdir` first:

- DIR holds no results.json (new, empty, or an interrupted run): the run uses DIR, so an
  interrupted checkpointed run resumes there as before.
- DIR holds a finished run of the same computational config (`config_diff.config_differences`:
  `NON_COMPUTATIONAL_FIELDS` and the sections the method does not read are not compared): the
  run uses DIR again and its results.json replaces the earlier one (same config; the code may
  have changed since). With checkpoints, the finished run's last checkpoint is restored and the
  results are written again without training.
- Otherwise (another config, or a results.json that cannot be read): DIR is left as it is and the
  run writes to the first of DIR-2, DIR-3, ... that is free by the same two rules, saying so in
  one line.

`latest_finished_run(DIR)` is the other half: of DIR, DIR-2, DIR-3, ... the one whose
results.json was written last, i.e. the directory the last run asked to write to DIR used
(`experiments.side_by_side --latest`, which `make run` calls).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping

import ml_collections

from esacl_jax.harness.config_diff import config_differences, plain_config

RESULTS = "results.json"
MAX_SIBLINGS = 1000  # DIR-2 ... DIR-1000: a bound, never reached in practice


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The directory a run writes to, and the one line to print about it (None: nothing to say)."""

    path: pathlib.Path
    note: str | None = None


def siblings(requested: str | os.PathLike) -> Iterator[pathlib.Path]:
    """DIR, DIR-2, DIR-3, ... (lazily, up to DIR-MAX_SIBLINGS)."""
    base = pathlib.Path(requested)
    yield base
    if base.name in ("", "..") or base.name.startswith("."):  # ".", "..", "/": by full path
        base = base.resolve()
    for n in range(2, MAX_SIBLINGS + 1):
        yield base.with_name(f"{base.name}-{n}")


def stored_differences(workdir: pathlib.Path, planned: Mapping) -> list[str] | None:
    """The config fields in which workdir's finished run differs from `planned` ([] : the same
    computation), or None when workdir holds no results.json. Raises ValueError when it holds
    one that cannot be read."""
    path = workdir / RESULTS
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"its {RESULTS} cannot be read ({type(err).__name__})") from err
    config = stored.get("config") if isinstance(stored, dict) else None
    if not isinstance(config, Mapping):
        raise ValueError(f"its {RESULTS} records no config")
    return [diff.split(":", 1)[0] for diff in config_differences(planned, config)]


def _fields(names: list[str], shown: int = 4) -> str:
    more = f", +{len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def resolve_workdir(config: ml_collections.ConfigDict | Mapping,
                    requested: str | os.PathLike) -> Workdir:
    """The directory a run of `config` asked to write to `requested` should use (module doc)."""
    planned = plain_config(config) if isinstance(config, ml_collections.ConfigDict) else \
        json.loads(json.dumps(dict(config)))
    first = pathlib.Path(requested)
    why = None
    for candidate in siblings(requested):
        try:
            diffs = stored_differences(candidate, planned)
        except ValueError as err:
            why = why or f"{first} holds a finished run whose config cannot be compared: {err}"
            continue
        if diffs:
            why = why or (f"{first} already holds a finished run with another config (differs "
                          f"in: {_fields(diffs)})")
            continue
        if candidate == first:
            note = None if diffs is None else (f"{first} holds a finished run with the same "
                                               "config: this run replaces its results")
            return Workdir(first, note)
        again = "" if diffs is None else " (replacing its finished run of the same config)"
        return Workdir(candidate, f"{why}; this run writes to {candidate}{again}")
    raise ValueError(f"{first} and {first}-2 ... {first}-{MAX_SIBLINGS} all hold finished runs "
                     "with other configs: choose another --workdir")


def latest_finished_run(requested: str | os.PathLike) -> pathlib.Path:
    """Of DIR and its siblings DIR-N, the one whose results.json is newest (DIR when none has
    one, so that the caller's error names the directory it was given)."""
    base = pathlib.Path(requested)
    pattern = re.compile(re.escape(base.name) + r"(-[2-9]|-[1-9]\d+)?")
    parent = base.parent
    best, best_time = base, None
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        entries = []
    for entry in [base, *entries]:
        if entry != base and not pattern.fullmatch(entry.name):
            continue
        try:
            written = (entry / RESULTS).stat().st_mtime_ns
        except OSError:
            continue
        if best_time is None or written > best_time:
            best, best_time = entry, written
    return best
