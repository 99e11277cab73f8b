"""Whether two configs describe the same computation: the one rule for reusing a finished run.

A single run reusing its workdir (`workdirs.resolve_workdir`) and a sweep skipping a run whose
results.json exists (`sweep.reuse.check_existing`) both ask it: the configs are compared leaving
out the fields that do not change the computation (`config.NON_COMPUTATIONAL_FIELDS`) and the
method-specific sections the planned method does not read (from the method registry). A field
only one side has is a difference.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import ml_collections

from esacl_jax.harness.config import NON_COMPUTATIONAL_FIELDS, sparse_start_of


def plain_config(config: ml_collections.ConfigDict) -> dict:
    """The config as stored in results.json (JSON types: tuples become lists)."""
    from esacl_jax.harness.atomic_io import to_jsonable

    return json.loads(json.dumps(to_jsonable(config.to_dict())))


@functools.lru_cache(maxsize=1)
def _section_readers() -> dict[str, frozenset[str]]:
    from esacl_jax.harness import methods

    return methods.section_readers()


# Stored configs from before `prunable` replaced `prune_scope`: the same set under its new name.
_OLD_PRUNE_SCOPES = {"all_but_classifier": "all_but_output", "sparcl": "by_layer_name"}


def _upgraded(stored: Mapping, planned: Mapping) -> Mapping:
    """A stored top-level config in today's spelling (`prune_scope` -> `prunable`; a config
    from before `sparse_start`, compared with one that has it: the start it ran,
    `config.sparse_start_of`, with ``esacl.init_rescale`` unset)."""
    if "sparse_start" not in stored and "sparse_start" in planned:
        stored = {**stored, "sparse_start": sparse_start_of(stored)}
        esacl = stored.get("esacl")
        if isinstance(esacl, Mapping) and "init_rescale" in esacl:
            stored["esacl"] = {**esacl, "init_rescale": None}
    if "prunable" in stored or stored.get("prune_scope") not in _OLD_PRUNE_SCOPES:
        return stored
    return {**stored, "prunable": _OLD_PRUNE_SCOPES[stored["prune_scope"]], "prune_scope": ""}


def config_differences(planned: Mapping, stored: Mapping, prefix: str = "") -> list[str]:
    """``"field: stored -> planned"`` for every field whose value differs between two configs.

    A field only one side has is a difference too. `NON_COMPUTATIONAL_FIELDS` at the top level
    and the method-specific sections (`esacl_jax.harness.methods.section_readers`) that the
    planned run's method does not read are never compared.
    """
    diffs = []
    if not prefix:
        stored = _upgraded(stored, planned)
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
