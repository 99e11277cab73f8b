"""Cost accounting of a run: training FLOPs, memory footprint and weight counts.

Training FLOPs (docs/METHOD.md "Training FLOPs") follow what the run executes: each method lists
the passes one step executes (`CostHooks.step_passes`, as `Pass` records: forward only or
forward + backward, over how many examples, through which layers) and the extra passes at a
task's end (`CostHooks.end_task_passes`, e.g. EWC's Fisher estimate); the loop counts them with
`count_passes` on a `flops.FlopsCounter` built from the layers `CostHooks.flops_layers` knows,
at the weight and gradient densities of `CostHooks.flops_densities` (sparse methods: their
masks).

Memory (docs/METHOD.md "Memory footprint", `memory_footprint`): the analytic bytes of what the
method must store (nonzero weights + mask bits from `CostHooks.sparse_masks`, the optimizer
state, the replay buffer, every other array it keeps between steps from
`CostHooks.stored_method_state`, one step's activations from `CostHooks.step_activation_bytes`)
and the measured peaks. `weight_counts`: nonzero and total parameters.

`CostHooks` holds the per-method defaults (every `methods.base.Method` has them); a method whose
costs differ overrides the hook, thinly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness import memory as memory_lib
from esacl_jax.harness.methods import state as state_lib

if TYPE_CHECKING:
    from esacl_jax.harness.data.base import Benchmark


class Pass(NamedTuple):
    """One pass a step executes, for the training-FLOPs count (METHOD.md accounting)."""

    kind: str  # "fwd" (forward only) or "fwd_bwd" (forward + activation and weight gradients)
    examples: int  # examples the pass touches
    # The top-level modules (first component of a kernel path, e.g. "stem", "classifier",
    # "projection_head") the pass runs through; None: every layer of `Method.flops_layers`.
    layers: tuple[str, ...] | None = None


class CostHooks:
    """The cost hooks of a method, with the defaults of plain SGD on the model (finetune).

    Mixed into `methods.base.Method`, whose `config` (batch size), `model` and `benchmark`
    (input shape) they read. Host-side, called as the run executes.
    """

    config: Any
    model: Any
    benchmark: Benchmark

    def step_passes(self) -> list[Pass]:
        """The passes one train step executes. Finetune: one forward+backward on the batch."""
        return [Pass("fwd_bwd", self.config.batch_size)]

    def step_passes_for_task(self, task_id: int) -> list[Pass]:
        """The passes one train step of task `task_id` executes (what the loop counts): the same
        for every task unless a method overrides it (CO2L: no past-model forward on task 0)."""
        del task_id
        return self.step_passes()

    def end_task_passes(self, num_examples: int) -> list[Pass]:
        """Extra passes at the end of a task (e.g. EWC's Fisher estimate). None by default."""
        del num_examples
        return []

    def flops_layers(self, params: Any, batch_stats: Any) -> list[flops_lib.LayerFlops]:
        """The conv/dense layers the FLOPs counter knows: the model's, from an abstract forward
        pass. Methods with layers of their own (CO2L's projection head) add them."""
        sample = jnp.zeros((1, *self.benchmark.input_shape), jnp.float32)
        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else \
            {"params": params}
        return flops_lib.layer_forward_flops(self.model, variables, sample)

    def sparse_masks(self, state: Any) -> Any | None:
        """The weight masks of a sparse method (bool pytree like params), None for dense ones."""
        del state
        return None

    def flops_densities(self, state: Any) -> tuple[dict | None, dict | None]:
        """(weight densities, gradient densities) by kernel path for the FLOPs count.

        None means dense. By default both follow `sparse_masks` (gradients masked by weights,
        g = s in METHOD.md's accounting); DGM-style methods override the gradient densities.
        """
        weight_masks = self.sparse_masks(state)
        if weight_masks is None:
            return None, None
        densities = flops_lib.densities_from_masks(weight_masks)
        return densities, densities

    def stored_method_state(self, state: Any) -> Any:
        """Method state the analytic memory footprint counts beside the params, the optimizer
        state and the replay buffer: every other array the method keeps between steps (EWC's
        Fisher and anchor, SparCL's masks and last gradient, the IDS and DDR tables, CO2L's
        past-model copy), so that state kept here and state kept in an optimizer count alike.
        By name (`methods.state.stored_entries`)."""
        return state_lib.stored_entries(state.method_state)

    def step_activation_bytes(self, state: Any, per_example: int, batch_size: int) -> int:
        """Activation bytes one step keeps for its backward pass, given the model's per-example
        bytes: the current batch's by default (CO2L: two views of batch + replay, head too)."""
        del state
        return per_example * batch_size


def count_passes(counter: flops_lib.FlopsCounter, passes: list[Pass], repeats: int) -> None:
    """Adds `repeats` executions of `passes` to the training-FLOPs counter.

    Args:
      counter: the run's counter (at the current densities).
      passes: the passes (`CostHooks.step_passes_for_task`, `CostHooks.end_task_passes`).
      repeats: how many times they ran (the chunk's valid steps; 1 at a task end).
    """
    for p in passes:
        if p.kind == "fwd":
            counter.forward(p.examples * repeats, p.layers)
        else:
            counter.forward_backward(p.examples * repeats, p.layers)


def memory_footprint(method: Any, state: Any, benchmark: Benchmark,
                     batch_size: int) -> dict[str, Any]:
    """Analytic bytes (sparse weights + mask bits, optimizer state, buffer, one step's
    activations) and the measured peak (host RSS; device memory statistics on GPU/TPU).

    Args:
      method: the run's `Method`.
      state: its train state (one seed's).
      benchmark: the run's benchmark (the input shape of the activation count).
      batch_size: the training batch size.

    Returns:
      {"analytic": `memory.analytic_footprint`'s dict, "measured": `memory.peak_memory`'s,
      "method_state_counted": the names of the method-state entries counted}.
    """
    sample = jnp.zeros((1, *benchmark.input_shape), jnp.float32)
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    activations = memory_lib.activation_bytes_per_example(method.model, variables, sample)
    stored = method.stored_method_state(state)
    analytic = memory_lib.analytic_footprint(
        state.params, masks=method.sparse_masks(state), opt_state=state.opt_state,
        buffer=state_lib.replay_buffer(state.method_state),
        activation_bytes=method.step_activation_bytes(state, activations, batch_size),
        method_state=stored)
    counted = sorted(stored) if isinstance(stored, dict) else []
    return {"analytic": analytic, "measured": memory_lib.peak_memory(),
            "method_state_counted": counted}


def weight_counts(params: Any) -> dict[str, Any]:
    """Nonzero and total counts over ALL parameters (every kernel, bias and norm scale).

    Args:
      params: the evaluated parameters.

    Returns:
      {"total", "nonzero", "sparsity" (1 - nonzero / total)}.
    """
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    total = int(sum(x.size for x in leaves))
    nonzero = int(sum(np.count_nonzero(x) for x in leaves))
    return {"total": total, "nonzero": nonzero,
            "sparsity": 1.0 - nonzero / total if total else 0.0}


__all__ = ["CostHooks", "Pass", "count_passes", "memory_footprint", "weight_counts"]
