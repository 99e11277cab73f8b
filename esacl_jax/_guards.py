"""The composition guards of `sdp_transform` and `keep_sparse`: every misuse they refuse at trace
time, each with one sentence naming the fix (the list is docs/OWN_LOOP.md's and the `sdp`
module docstring's; tests/test_sdp_compose.py and tests/test_no_silent_failure.py check each).

Most checks read Python-level facts during tracing: the identity of the leaves keep_sparse hands
the transform (`KeepSparseCall`), and the frames of the optax wrappers around the call (chain,
MultiSteps, apply_if_finite, inject_hyperparams). Nothing here runs inside the compiled step.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterator
from typing import Any

import jax
import optax

from esacl_jax import masks as masks_lib
from esacl_jax.masks import PyTree

KEEP_SPARSE_MARKER = "_esacl_keep_sparse"
PERTURBATIONS = ("global", "per_device")

MISSING_WRAPPER = (
    "sdp_transform was updated outside keep_sparse, so pruned weights would drift (momentum, Adam "
    "state and weight decay of the optimizer chained after it move them off zero): wrap the chain "
    "as esacl_jax.keep_sparse(optax.chain(sdp_transform(...), optimizer)), or build "
    "sdp_transform(..., check_projection=False) if you zero the pruned weights yourself."
)
MISSING_GRAD_FN = (
    "sdp_transform.update needs grad_fn=, the gradient function it evaluates at the perturbed "
    "params (without it SAM would silently be off): call tx.update(grads, state, params, "
    "grad_fn=lambda p: jax.grad(loss)(p, batch)) (with flax's TrainState use "
    "esacl_jax.flax_utils.SDPTrainState.apply_gradients(grads=..., grad_fn=...)), or build "
    "sdp_transform(rho=0) or sdp_transform(..., require_grad_fn=False) to use the incoming "
    "gradient as it is."
)
NOT_FIRST = (
    "sdp_transform must be the first transform inside keep_sparse: it replaces the incoming "
    "gradient by grad_fn(w + eps), so whatever runs before it (an optimizer, "
    "clip_by_global_norm, ...) is discarded; move it after: "
    "keep_sparse(optax.chain(sdp_transform(...), optax.clip_by_global_norm(1.0), optimizer))."
)
NO_OPTIMIZER = (
    "no optimizer runs after sdp_transform: its output is a gradient, which optax.apply_updates "
    "would add to the params (gradient ascent); chain one after it: "
    "keep_sparse(optax.chain(sdp_transform(...), optax.sgd(learning_rate)))."
)
RAW_GRADIENT = (
    "some parameters receive the raw gradient as their update (no optimizer ran on them, e.g. "
    "leaves left out by optax.masked), which optax.apply_updates would add (gradient ascent): "
    "give every leaf an optimizer with optax.multi_transform, or optax.set_to_zero() to freeze it."
)
NOT_UPDATED = (
    "the sdp_transform inside keep_sparse was not updated with keep_sparse's extra arguments (a "
    "transform between them dropped them, e.g. a plain optax.GradientTransformation wrapper): "
    "put sdp_transform directly in the optax.chain that keep_sparse wraps."
)
MULTISTEPS = (
    "sdp_transform cannot run inside optax.MultiSteps, which would perturb with one "
    "micro-batch's gradient and call grad_fn at every micro-step: accumulate inside one update "
    "instead, with grads = esacl_jax.accumulate_grad_fn(per_batch_grad, microbatches)(params) "
    "and grad_fn=esacl_jax.accumulate_grad_fn(per_batch_grad, microbatches)."
)
IF_FINITE = (
    "optax.apply_if_finite around sdp_transform checks only the clean gradient, not the one "
    "grad_fn returns: put it after sdp_transform, "
    "keep_sparse(optax.chain(sdp_transform(...), optax.apply_if_finite(optimizer, 5)))."
)
BEFORE_KEEP_SPARSE = (
    "a transform runs before keep_sparse (or esacl_optimizer) in an optax.chain: its output only "
    "sets the direction of SAM's perturbation and never reaches the applied gradient, which "
    "grad_fn recomputes, so it would be silently dropped; put it inside, after sdp_transform: "
    "keep_sparse(optax.chain(sdp_transform(...), optax.clip_by_global_norm(1.0), optimizer))."
)
AFTER_KEEP_SPARSE = (
    "a transform runs after keep_sparse (or esacl_optimizer) in an optax.chain: it would change "
    "the projected updates, so pruned weights would drift off zero; keep_sparse must be the "
    "outermost transform: put it inside, keep_sparse(optax.chain(sdp_transform(...), optimizer, "
    "optax.scale(0.5)))."
)
MULTISTEPS_INSIDE = (
    "optax.MultiSteps inside keep_sparse (or esacl_optimizer) would apply the accumulated "
    "updates of several sdp_transform steps, each perturbed with one micro-batch: accumulate "
    "inside one update instead, with esacl_jax.accumulate_grad_fn (see its docstring)."
)
INJECTED_STATIC = (
    "optax.inject_hyperparams made sdp_transform's {name} a mutable hyperparameter, but it is "
    "used only when the masks are made (init), so changing it would do nothing: keep it static "
    "with optax.inject_hyperparams(sdp_transform, static_args=esacl_jax.STATIC_ARGS) (the same "
    "for esacl_optimizer)."
)
GRAD_FN_STRUCTURE = (
    "grad_fn returned a tree of another structure than the params ({got} leaves, expected "
    "{want}): return the gradient in the params' structure (with flax nnx: "
    "nnx.as_pure(nnx.state(grads, nnx.Param)))."
)

PER_DEVICE_REDUCED = (
    'perturbation="per_device" got a gradient that is already reduced over batch_axis_name '
    "(under jax.shard_map, jax.grad with respect to replicated params sums over the devices): "
    "compute it at jax.lax.pcast(params, axis_name, to='varying') so that each device perturbs "
    "along its own gradient."
)
INSIDE_MASKED = (
    "keep_sparse received partial params (optax.MaskedNode leaves): put keep_sparse outside "
    "optax.masked / optax.multi_transform, keep_sparse(optax.multi_transform({'sparse': "
    "optax.chain(sdp_transform(...), opt), ...}, labels)), so grad_fn gets the full params."
)
INJECTED_RHO_SCHEDULE = (
    "rho is scheduled by optax.inject_hyperparams, whose schedule esacl_gradients cannot see, "
    "so the step's rho and the transform's would differ: pass the schedule to the transform "
    "itself, esacl_optimizer(optimizer, rho=schedule) (a function of the step count)."
)
UNKNOWN_RHO = (
    "the sdp_transform state holds no rho that esacl_gradients can read (rho was built from an "
    "array outside optax.inject_hyperparams): build it with a Python float or a schedule."
)


# ----------------------------------------------------------------------------- arguments


def check_options(
    sparsity: Any, rho: Any, distribution: str, score: str, regrow: str, every: Any,
    perturbation: str, batch_axis_name: Any,
) -> None:
    """Check the static choices and whatever numbers are concrete (traced ones pass through)."""
    if distribution not in masks_lib.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {masks_lib.DISTRIBUTIONS}: {distribution!r}")
    if score not in masks_lib.SCORE_KINDS:
        raise ValueError(f"score must be one of {masks_lib.SCORE_KINDS}: {score!r}")
    if regrow not in masks_lib.REGROW_KINDS:
        raise ValueError(f"regrow must be one of {masks_lib.REGROW_KINDS}: {regrow!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}: {perturbation!r}")
    if perturbation == "per_device" and batch_axis_name is None:
        raise ValueError('perturbation="per_device" needs batch_axis_name= (the axis of '
                         "jax.shard_map or pmap the devices' gradients are reduced over)")
    s = masks_lib.concrete(sparsity)
    if s is not None and not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {s}")
    r = masks_lib.concrete(rho)
    if r is not None and r < 0.0:
        raise ValueError(f"rho must be >= 0, got {r}")
    e = masks_lib.concrete(every, int)
    if e is not None and e < 0:
        raise ValueError(f"mask_update_every_steps must be >= 0, got {e}")


def check_init_only_args(**values: Any) -> None:
    """Refuse an init-only argument that `optax.inject_hyperparams` turned into an array."""
    if not any(isinstance(v, jax.Array) for v in values.values()):
        return
    if _inside_inject_hyperparams():
        name = next(k for k, v in values.items() if isinstance(v, jax.Array))
        raise ValueError(INJECTED_STATIC.format(name=name))


def check_not_multisteps(optimizer: Any) -> None:
    """Refuse an `optax.MultiSteps` given as `esacl_optimizer`'s optimizer."""
    if isinstance(optimizer, optax.MultiSteps) or isinstance(
            getattr(getattr(optimizer, "update", None), "__self__", None), optax.MultiSteps):
        raise ValueError(MULTISTEPS_INSIDE)


# ----------------------------------------------------------------------------- trace-time checks


def _code_objects(fn: Any) -> set[types.CodeType]:
    """The code object of `fn` and of every function defined inside it."""
    todo, seen = [fn.__code__], set()
    while todo:
        code = todo.pop()
        seen.add(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return seen


@functools.cache
def _optax_codes(name: str) -> frozenset[types.CodeType]:
    """The code objects of the optax functions a guard looks for above it (computed once):
    "multisteps", "if_finite", "chain" (the update of chain / named_chain) or "inject"."""
    functions = {
        "multisteps": [optax.MultiSteps.update],
        "if_finite": [optax.apply_if_finite],
        "chain": [optax.chain, optax.named_chain],
        "inject": [getattr(optax, n) for n in ("inject_hyperparams",
                                                "inject_stateful_hyperparams")
                   if hasattr(optax, n)],
    }[name]
    codes = set().union(*(_code_objects(fn) for fn in functions))
    if name == "chain":
        codes = {c for c in codes if c.co_name == "update_fn"}
    return frozenset(codes)


def _frames_in(codes: frozenset[types.CodeType]) -> Iterator[types.FrameType]:
    """The frames above the guard's caller (innermost first) running one of `codes`."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes:
            yield frame
        frame = frame.f_back


def check_enclosing() -> None:
    """Raise when called (at trace time) from inside optax.MultiSteps or optax.apply_if_finite."""
    for name, message in (("multisteps", MULTISTEPS), ("if_finite", IF_FINITE)):
        if next(_frames_in(_optax_codes(name)), None) is not None:
            raise ValueError(message)


def check_chain_position() -> None:
    """Raise when `keep_sparse.update` runs inside an `optax.chain` / `optax.named_chain` with
    another transform before it (its output would be dropped) or after it (it would move pruned
    weights off zero). Reads the enclosing chain's progress from its frame at trace time."""
    for frame in _frames_in(_optax_codes("chain")):
        local = frame.f_locals
        done = local.get("new_state")
        members = local.get("update_fns", local.get("transforms"))
        if done is not None and members is not None:
            if len(done) > 0:
                raise ValueError(BEFORE_KEEP_SPARSE)
            if len(done) < len(members) - 1:
                raise ValueError(AFTER_KEEP_SPARSE)


def _inside_inject_hyperparams() -> bool:
    """Whether the guard's caller runs inside `optax.inject_hyperparams`'s init or update."""
    return next(_frames_in(_optax_codes("inject")), None) is not None


def is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: PyTree) -> bool:
    return any(is_masked_node(x) for x in jax.tree.leaves(tree, is_leaf=is_masked_node))


def axes(axis_name: Any) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def varies(x: Any, axis_name: Any) -> bool | None:
    """Whether `x` varies over the mapped axes (shard_map's typing), None when not typed so."""
    varying = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", None)
    if varying is None:
        return None
    return all(a in varying for a in axes(axis_name))


class KeepSparseCall:
    """What `keep_sparse` tells the `sdp_transform` inside it during one `update` (Python
    objects, trace time only): the full params and the identity of the incoming gradient's
    leaves, and back the identity of the transform's output leaves."""

    def __init__(self, updates: PyTree, params: PyTree):
        self.params = params
        self.inputs = jax.tree.leaves(updates)  # kept alive so that their ids stay unique
        self.input_ids = {id(x) for x in self.inputs}
        self.outputs: list[Any] = []
        self.updated = 0


def check_transform_update(updates: PyTree, params: PyTree | None, extra_args: dict,
                           check_projection: bool) -> KeepSparseCall | None:
    """The checks at the start of `sdp_transform.update`; returns keep_sparse's call record
    (None when the transform runs outside keep_sparse with check_projection=False)."""
    check_enclosing()
    call = extra_args.get(KEEP_SPARSE_MARKER)
    if not isinstance(call, KeepSparseCall):
        call = None
    if check_projection and call is None:
        raise ValueError(MISSING_WRAPPER)
    if params is None:
        raise ValueError("sdp_transform needs params: call update(updates, state, params)")
    if call is not None:
        call.updated += 1
        if not all(id(x) in call.input_ids for x in jax.tree.leaves(updates)):
            raise ValueError(NOT_FIRST)
    return call


def check_grad_fn(grad_fn: Any, require_grad_fn: bool, static_rho: float | None) -> None:
    """Refuse an update with no grad_fn where SAM would silently be off."""
    if grad_fn is None and require_grad_fn and static_rho != 0.0:
        raise ValueError(MISSING_GRAD_FN)


def check_per_device(updates: PyTree, perturbation: str, static_rho: float | None,
                     batch_axis_name: Any) -> None:
    """Refuse perturbation="per_device" with a gradient already reduced over the devices."""
    if perturbation == "per_device" and static_rho != 0.0 and any(
        varies(x, batch_axis_name) is False for x in jax.tree.leaves(updates)
    ):
        raise ValueError(PER_DEVICE_REDUCED)


def check_keep_sparse_state(state: Any) -> None:
    """Refuse an `optax.MultiSteps` inside keep_sparse (seen in the chain's state at init)."""
    is_multisteps = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
    if any(is_multisteps(x) for x in jax.tree.leaves(state, is_leaf=is_multisteps)):
        raise ValueError(MULTISTEPS_INSIDE)


def check_keep_sparse_update(params: PyTree | None) -> None:
    """The checks at the start of `keep_sparse.update`: what encloses it, where it sits in an
    outer chain, and its params (the full ones)."""
    check_enclosing()
    check_chain_position()
    if params is None:
        raise ValueError("keep_sparse needs params: call update(updates, state, params)")
    if has_masked_nodes(params):
        raise ValueError(INSIDE_MASKED)


def check_chain_output(call: KeepSparseCall, new_updates: PyTree) -> None:
    """Refuse a chain whose final updates are the transform's output (no optimizer after it)
    or the raw gradient, or whose sdp_transform never got keep_sparse's extra arguments."""
    if not call.updated:
        raise ValueError(NOT_UPDATED)
    output_ids = {id(x) for x in call.outputs}
    final = jax.tree.leaves(new_updates)
    if any(id(x) in output_ids for x in final):
        raise ValueError(NO_OPTIMIZER)
    if any(id(x) in call.input_ids for x in final):
        raise ValueError(RAW_GRADIENT)
