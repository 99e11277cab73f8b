"""Typed method state: what a method keeps between steps (`TrainState.method_state`).

One NamedTuple per method family (NamedTuples are pytrees: checkpoints, seed groups and the
compiled steps take them as they are). A field a configuration does not use holds `ABSENT`
(the empty tuple: no leaves, nothing stored, nothing counted), never None.

The fields of every state are in alphabetical order, so a state's leaves come in the order of the
dict of the same entries (the form method state had before): the same compiled programs, the
same checkpoint content. The sparse wrappers (SparCL, prune-then-retrain) run their base method's
hooks on their own state: a wrapper's state has every field its bases may fill, and the base
hooks update their fields with `_replace`, whatever the NamedTuple they are given.

Two functions read a state without knowing its family: `replay_buffer` (the loop's and the
memory accounting's one way to the replay buffer) and `stored_entries` (every other entry, for
the memory footprint).
"""

from __future__ import annotations

from typing import Any, NamedTuple

# A field the method's configuration does not use: no leaves.
ABSENT: tuple = ()


class NoState(NamedTuple):
    """Methods that keep nothing between steps (finetune, joint)."""


class ReplayState(NamedTuple):
    """ER and DER++: the reservoir buffer."""

    buffer: Any  # replay.ReplayBuffer


class EsaCLState(NamedTuple):
    """EsaCL: the reservoir buffer (size 0 without replay) and, for step variant C, the IDS
    score table."""

    buffer: Any  # replay.ReplayBuffer
    example_stats: Any = ABSENT  # ids.ExampleStats (step variant C)


class EWCState(NamedTuple):
    """Online EWC: the parameters at the last task end and the running Fisher."""

    checkpoint: Any  # params-like
    fisher: Any  # params-like, float32


class CO2LState(NamedTuple):
    """CO2L: the reservoir buffer and the past model's encoder and head."""

    buffer: Any  # replay.ReplayBuffer
    past_params: Any  # params-like, without the classifier


class SparCLState(NamedTuple):
    """SparCL over any base: its masks, gradient, DGM and DDR entries, and its base's fields
    (EWC's, a replay buffer, CO2L's past model)."""

    buffer: Any = ABSENT  # bases er, derpp, co2l
    checkpoint: Any = ABSENT  # base ewc
    ddr_keep: Any = ABSENT  # bool [capacity] (DDR)
    dgm_step: Any = ABSENT  # int32 scalar (DGM)
    example_stats: Any = ABSENT  # ids.ExampleStats (DDR)
    fisher: Any = ABSENT  # base ewc
    grad_masks: Any = ABSENT  # bool, params-like (DGM)
    last_grad: Any = ABSENT  # float32, params-like (scalars on dense leaves)
    masks: Any = ABSENT  # bool, params-like: the weight masks
    ncm_means: Any = ABSENT  # float32 [classes, head_dim] (SparCL-CO2L's DDR)
    ncm_seen: Any = ABSENT  # bool [classes] (SparCL-CO2L's DDR)
    past_params: Any = ABSENT  # base co2l


class PruneRetrainState(NamedTuple):
    """Prune-then-retrain over any base: its masks, whether they are pruned, and its base's
    fields."""

    buffer: Any = ABSENT  # bases er, derpp
    checkpoint: Any = ABSENT  # base ewc
    fisher: Any = ABSENT  # base ewc
    masks: Any = ABSENT  # bool, params-like: the weight masks
    pruned: Any = ABSENT  # bool scalar: the masks are the task end's pruned ones


def is_absent(value: Any) -> bool:
    """Whether a state field is `ABSENT` (unused by the configuration).

    Args:
      value: a field's value.

    Returns:
      True for the empty plain tuple.
    """
    return type(value) is tuple and not value


def widen(state_type: type, base_state: Any, **fields: Any) -> Any:
    """A wrapper's state from its base method's state and its own fields.

    Args:
      state_type: the wrapper's NamedTuple (`SparCLState`, `PruneRetrainState`).
      base_state: the base method's initial state (any state NamedTuple).
      **fields: the wrapper's own fields.

    Returns:
      A `state_type` with the base's fields, `fields`, and `ABSENT` elsewhere.
    """
    return state_type(**base_state._asdict(), **fields)


def replay_buffer(method_state: Any) -> Any | None:
    """The replay buffer a method state holds, whatever its family.

    Args:
      method_state: a `TrainState.method_state`.

    Returns:
      The `replay.ReplayBuffer`, or None when the method keeps none.
    """
    buffer = getattr(method_state, "buffer", ABSENT)
    return None if is_absent(buffer) else buffer


def stored_entries(method_state: Any) -> dict[str, Any]:
    """Every entry of a method state but the replay buffer and the absent ones, by name.

    Args:
      method_state: a `TrainState.method_state`.

    Returns:
      {field name: value}, in field (alphabetical) order.
    """
    return {name: value for name, value in method_state._asdict().items()
            if name != "buffer" and not is_absent(value)}


__all__ = ["ABSENT", "CO2LState", "EWCState", "EsaCLState", "NoState", "PruneRetrainState",
           "ReplayState", "SparCLState", "is_absent", "replay_buffer", "stored_entries", "widen"]
