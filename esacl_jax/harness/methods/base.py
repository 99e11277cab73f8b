"""The small interface between a continual-learning method and the training loop.

A method owns: how the train state is initialised, one pure (jit-compiled) train step, and
host-side hooks at task and epoch boundaries. The loop never knows which method it runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from esacl_jax import masks as masks_lib
from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness import losses
from esacl_jax.harness.config import sparse_start_of
from esacl_jax.harness.data.augment import augment_batch
from esacl_jax.harness.data.base import Benchmark, class_mask, preprocess
from esacl_jax.harness.methods import state as state_lib
from esacl_jax.harness.methods.costs import CostHooks, Pass
from esacl_jax.harness.methods.registry import method_class
from esacl_jax.harness.models import forward, init_variables


class TrainState(flax.struct.PyTreeNode):
    """Everything a run carries from step to step, as one pytree (checkpointable, shardable)."""

    step: jax.Array  # int32, global step counter (drives per-step PRNG keys)
    task_id: jax.Array  # int32, position in the task sequence
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    method_state: Any  # a `methods.state` NamedTuple: replay buffer, Fisher, masks, ...
    rng: jax.Array  # typed PRNG key of the run


class Batch(NamedTuple):
    """One training minibatch as the step sees it."""

    x: jax.Array  # preprocessed (and augmented) float inputs
    x_raw: jax.Array  # un-augmented inputs in their compact dtype (what the replay buffer stores)
    y: jax.Array  # int32 global labels
    index: jax.Array  # int32 positions in the task's training set (per-example statistics)


class TaskContext(NamedTuple):
    """Per-task arrays passed into the compiled step (arguments, so no recompilation per task)."""

    task_id: jax.Array  # int32 scalar
    task_classes: jax.Array  # bool [num_classes]: classes of the task being trained
    seen_classes: jax.Array  # bool [num_classes]: classes of tasks 0..task_id


def task_context(benchmark: Benchmark, task_id: int) -> TaskContext:
    """Task `task_id`'s context: what the compiled step takes of the task.

    Args:
      benchmark: the run's benchmark.
      task_id: the task's position.

    Returns:
      Its `TaskContext`.
    """
    k = benchmark.num_classes
    return TaskContext(
        task_id=jnp.asarray(task_id, jnp.int32),
        task_classes=jnp.asarray(class_mask(benchmark.tasks[task_id].classes, k)),
        seen_classes=jnp.asarray(class_mask(benchmark.classes_up_to(task_id), k)),
    )


class StepMetrics(NamedTuple):
    loss: jax.Array
    accuracy: jax.Array


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The base optimizer named by config.optimizer (the protocols use plain SGD)."""
    name, lr = config.optimizer, config.learning_rate
    if name == "sgd":
        return optax.sgd(lr, momentum=config.momentum or None)
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


# The deprecated `config.prune_scope` values and the `config.prunable` sets they name.
OLD_PRUNE_SCOPES = {"all_but_classifier": "all_but_output", "sparcl": "by_layer_name"}


def prunable_set(config: ml_collections.ConfigDict) -> str:
    """The prunable set sparse methods use: `config.prunable`, a name of the library's
    `masks.PRUNABLE_SETS` (what `prunable=` takes), or the deprecated `config.prune_scope`.

    Args:
      config: the run's config.

    Returns:
      A name in `masks.PRUNABLE_SETS`.

    Raises:
      ValueError: an unknown name, or `prune_scope` and `prunable` naming different sets.
    """
    prunable = config.get("prunable", "all_but_output")
    if prunable not in masks_lib.PRUNABLE_SETS:
        raise ValueError(f"prunable must be one of {', '.join(masks_lib.PRUNABLE_SETS)}, got "
                         f"{prunable!r}")
    scope = config.get("prune_scope", "")
    if not scope:
        return prunable
    if scope not in OLD_PRUNE_SCOPES:
        raise ValueError(f"prune_scope is deprecated: use prunable= one of "
                         f"{', '.join(masks_lib.PRUNABLE_SETS)} (got prune_scope={scope!r})")
    new = OLD_PRUNE_SCOPES[scope]
    if prunable not in ("all_but_output", new):
        raise ValueError(f"prune_scope={scope!r} (deprecated: prunable={new!r}) contradicts "
                         f"prunable={prunable!r}: set prunable alone")
    logging.getLogger("esacl_jax").warning(
        "config.prune_scope=%r is deprecated: use config.prunable=%r (the same set)", scope, new)
    return new


class Method(CostHooks):
    """Base class: plain SGD on the current task (finetune). Subclasses override the hooks.

    Hooks, in the order the loop calls them:
      init -> per task: training_data, begin_task, per epoch: [epoch_indices, begin_epoch,
      train_step (compiled, scanned over the epoch)], end_task -> eval_variables for evaluation.
    The cost hooks (training-FLOPs passes, memory) are `costs.CostHooks`'.
    """

    name = "finetune"
    scenarios: tuple[str, ...] = ("class_il", "domain_il")
    # Facts reports and sweeps read through the registry (`methods.sparsity_key` and friends):
    config_section: str | None = None  # the config sub-dict holding this method's own knobs
    extra_config_sections: tuple[str, ...] = ()  # other sub-dicts it reads (a wrapper's base's)
    sparse: bool = False  # True: `<config_section>.sparsity` is the method's target sparsity
    uses_buffer: bool = False  # True: the method trains with the replay buffer

    def __init__(self, config: ml_collections.ConfigDict, model, benchmark: Benchmark):
        if benchmark.scenario not in self.scenarios:
            raise ValueError(f"method {self.name!r} does not support scenario "
                             f"{benchmark.scenario!r}")
        self.config = config
        self.model = model
        self.benchmark = benchmark
        self.num_classes = benchmark.num_classes
        self.use_task_logit_mask = bool(config.current_task_logit_mask)
        # Which weights sparse methods prune (config.prunable, the library's vocabulary).
        self.prunable = prunable_set(config)
        self.tx = self.make_optimizer()

    # ----- state -----
    def make_optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config)

    def init_method_state(self, params: Any) -> Any:
        """The method's state at initialisation (`methods.state`: a NamedTuple per family)."""
        del params
        return state_lib.NoState()

    def init_params(self, key: jax.Array) -> tuple[Any, Any]:
        """(params, batch_stats) at initialisation: the model's; methods that train more than the
        model (CO2L's projection head) add their parameters here."""
        sample = jnp.zeros((1, *self.benchmark.input_shape), jnp.float32)
        return init_variables(self.model, key, sample)

    def init(self, key: jax.Array) -> TrainState:
        init_key, run_key = jax.random.split(key)
        params, batch_stats = self.init_params(init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            task_id=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=self.tx.init(params),
            method_state=self.init_method_state(params),
            rng=run_key,
        )

    # ----- the compiled step -----
    def prepare_inputs(self, key: jax.Array, x_raw: jax.Array) -> jax.Array:
        """Augments (per the benchmark's protocol) and normalises compact inputs, inside jit."""
        b = self.benchmark
        return preprocess(augment_batch(key, x_raw, b.augment), b.mean, b.std)

    def current_loss_mask(self, ctx: TaskContext) -> jax.Array | None:
        """Logit mask for the current-task cross-entropy (SparCL's use_cl_mask when enabled)."""
        return ctx.task_classes if self.use_task_logit_mask else None

    def replay_loss(self, params: Any, batch_stats: Any, state: TrainState,
                    key: jax.Array) -> jax.Array:
        """Extra loss terms (replay, regularisers). Zero for finetune."""
        del params, batch_stats, state, key
        return jnp.zeros((), jnp.float32)

    def objective(self, current_per_example: jax.Array, params: Any, batch_stats: Any,
                  state: TrainState, key: jax.Array) -> jax.Array:
        """The step's loss from the current batch's per-example CE: its mean + `replay_loss`."""
        return current_per_example.mean() + self.replay_loss(params, batch_stats, state, key)

    def after_step(self, state: TrainState, batch: Batch, ctx: TaskContext, logits: jax.Array,
                   per_example_loss: jax.Array, key: jax.Array) -> Any:
        """New method_state after a step (e.g. reservoir insertion). Identity by default."""
        del batch, ctx, logits, per_example_loss, key
        return state.method_state

    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        """One SGD step on current-task CE + replay_loss; pure, runs inside lax.scan."""
        replay_key, after_key = jax.random.split(key)
        mask = self.current_loss_mask(ctx)

        def loss_fn(params):
            logits, new_stats = forward(self.model, params, state.batch_stats, batch.x, train=True)
            per_example = losses.cross_entropy(logits, batch.y, mask)
            total = self.objective(per_example, params, state.batch_stats, state, replay_key)
            return total, (logits, new_stats, per_example)

        (loss, (logits, new_stats, per_example)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        method_state = self.after_step(state, batch, ctx, logits, per_example, after_key)
        return self.finish_step(state, batch, ctx, params, new_stats, opt_state, method_state,
                                logits, loss)

    def finish_step(self, state: TrainState, batch: Batch, ctx: TaskContext, params: Any,
                    batch_stats: Any, opt_state: Any, method_state: Any, logits: jax.Array,
                    loss: jax.Array) -> tuple[TrainState, StepMetrics]:
        """The new state (step counter advanced) and the step's metrics, shared by the steps."""
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, method_state=method_state)
        accuracy = losses.correct(logits, batch.y, self.current_loss_mask(ctx)).mean()
        return new_state, StepMetrics(loss, accuracy)

    # ----- host-side hooks -----
    def training_data(self, task_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) arrays trained on during task `task_id`."""
        task = self.benchmark.tasks[task_id]
        return task.x_train, task.y_train

    def begin_task(self, state: TrainState, task_id: int) -> TrainState:
        if self.config.reset_optimizer_per_task:
            state = state.replace(opt_state=self.tx.init(state.params))
        return state

    def epoch_indices(self, state: TrainState, task_id: int, epoch: int,
                      num_examples: int) -> np.ndarray | None:
        """Positions of the examples used this epoch (None: all). Data-removal methods override."""
        del state, task_id, epoch, num_examples
        return None

    def begin_epoch(self, state: TrainState, task_id: int, epoch: int) -> TrainState:
        del task_id, epoch
        return state

    def end_task(self, state: TrainState, task_id: int, x: np.ndarray, y: np.ndarray) -> TrainState:
        del task_id, x, y
        return state

    def eval_variables(self, state: TrainState) -> tuple[Any, Any]:
        """(params, batch_stats) used for evaluation."""
        return state.params, state.batch_stats

    # ----- cost accounting: the hooks of `costs.CostHooks` (step_passes, flops_layers, ...)

    def summary(self, state: TrainState) -> dict:
        """Extra per-task facts for results.json (e.g. sparsity). Host-side."""
        del state
        return {}


# ----------------------------------------------------------------------------- compiled steps


def make_train_chunk(method: Method) -> Callable:
    """A jit-compiled function running a fixed-size chunk of steps as one compiled loop.

    `run_chunk(state, x_all, y_all, batch_idx, valid, ctx) -> (state, StepMetrics)`: the steps
    whose `valid` flag is set run in order; the others (the padding of an epoch's last chunk)
    are skipped and report NaN metrics. Every chunk has the same shape, so the whole run
    compiles once.

    The loop is a `lax.while_loop` over the valid steps only: padding is skipped by the trip
    count instead of a `lax.cond` around every step (whose branches carry the whole train state,
    replay buffer included; about 10% of a split_mnist DER++ step on CPU), and padded steps cost
    nothing. Each step's metrics (float32 scalars, as before) land at the step's position of
    NaN-filled per-step arrays.
    """

    def step(state: TrainState, x_all, y_all, idx, ctx):
        key = jax.random.fold_in(state.rng, state.step)
        aug_key, step_key = jax.random.split(key)
        x_raw = x_all[idx]
        x = method.prepare_inputs(aug_key, x_raw)
        return method.train_step(state, Batch(x=x, x_raw=x_raw, y=y_all[idx], index=idx),
                                 ctx, step_key)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def run_chunk(state, x_all, y_all, batch_idx, valid, ctx):
        num_steps = batch_idx.shape[0]
        valid = jnp.asarray(valid, bool)
        # Positions of the valid steps, in order (the loop's padding is trailing already).
        order = jnp.argsort(~valid, stable=True).astype(jnp.int32)
        count = jnp.sum(valid, dtype=jnp.int32)
        nan = jnp.full((num_steps,), jnp.nan, jnp.float32)
        metrics = StepMetrics(nan, nan)

        def body(carry):
            i, state, metrics = carry
            pos = order[i]
            state, m = step(state, x_all, y_all, batch_idx[pos], ctx)
            metrics = StepMetrics(*(all_.at[pos].set(jnp.asarray(one, jnp.float32))
                                    for all_, one in zip(metrics, m, strict=True)))
            return i + 1, state, metrics

        _, state, metrics = jax.lax.while_loop(
            lambda carry: carry[0] < count, body, (jnp.zeros((), jnp.int32), state, metrics))
        return state, metrics

    return run_chunk


# ----------------------------------------------------------------------------- sparse wrappers


class SparseWrapperMethod(Method):
    """A method that runs a dense base method's loss and hooks with weight masks of its own.

    Shared by SparCL and prune-then-retrain. The base (a method registry name) supplies
    `replay_loss` (replay terms or the EWC penalty), `after_step` (reservoir insertion), `end_task`
    (EWC's Fisher), `step_passes` and `end_task_passes`, and, for bases that train more than the
    model or evaluate with other weights (CO2L), `init_params`, `eval_variables`, `flops_layers`
    and the memory hooks; its state's fields are fields of this method's state too
    (`methods.state`), so the base's hooks run on this method's state as they are.
    """

    allowed_bases: tuple[str, ...] = ()
    base_name: str | None = None  # fixed by the convenience subclasses; else from the config

    def __init__(self, config: ml_collections.ConfigDict, model, benchmark,
                 base_name: str | None = None):
        base_name = self.base_name or base_name
        if base_name not in self.allowed_bases:
            raise ValueError(f"{self.name} base must be one of {self.allowed_bases}, "
                             f"got {base_name!r}")
        self.base = method_class(base_name)(config, model, benchmark)
        self.scenarios = self.base.scenarios
        super().__init__(config, model, benchmark)

    def make_optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config)

    def replay_loss(self, params, batch_stats, state, key):
        return self.base.replay_loss(params, batch_stats, state, key)

    def init_params(self, key: jax.Array) -> tuple[Any, Any]:
        return self.base.init_params(key)

    def eval_variables(self, state: TrainState) -> tuple[Any, Any]:
        return self.base.eval_variables(state)

    def step_passes(self) -> list[Pass]:
        return self.base.step_passes()

    def step_passes_for_task(self, task_id: int) -> list[Pass]:
        return self.base.step_passes_for_task(task_id)

    def end_task_passes(self, num_examples: int) -> list[Pass]:
        return self.base.end_task_passes(num_examples)

    def flops_layers(self, params: Any, batch_stats: Any) -> list[flops_lib.LayerFlops]:
        return self.base.flops_layers(params, batch_stats)

    def step_activation_bytes(self, state: TrainState, per_example: int, batch_size: int) -> int:
        return self.base.step_activation_bytes(state, per_example, batch_size)

    def sparse_start(self, params: Any, weight_masks: Any) -> Any:
        """The sparse weights where the method first sets them (SparCL at initialisation,
        prune-then-retrain at each pruning): `params` magnitude-pruned by `weight_masks`, the
        kept ones rescaled to each unit's dense norm when config.sparse_start is "rescaled".

        Args:
          params: the dense params.
          weight_masks: their magnitude masks.

        Returns:
          The sparse params.
        """
        return masks_lib.masked_start(params, weight_masks,
                                      rescale=sparse_start_of(self.config) == "rescaled")

    def sparse_masks(self, state: TrainState) -> Any:
        """The weight masks (method_state.masks, every wrapper's state has them): the memory
        footprint and the compact export of the trained model (sparse_model.npz) read them."""
        return state.method_state.masks

    def loss_and_grads(self, state: TrainState, batch: Batch, ctx: TaskContext,
                       key: jax.Array) -> tuple[jax.Array, tuple, Any]:
        """The base method's loss (current-task CE + base terms) and its dense gradient."""
        mask = self.current_loss_mask(ctx)

        def loss_fn(params):
            logits, new_stats = forward(self.model, params, state.batch_stats, batch.x, train=True)
            per_example = losses.cross_entropy(logits, batch.y, mask)
            total = self.base.objective(per_example, params, state.batch_stats, state, key)
            return total, (logits, new_stats, per_example)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return loss, aux, grads

    def masked_update(self, state: TrainState, grads: Any, weight_masks: Any) -> tuple[Any, Any]:
        """Optimizer step on masked grads; updates and resulting params masked: exact zeros."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        updates = masks_lib.apply_masks(updates, weight_masks)
        params = masks_lib.apply_masks(optax.apply_updates(state.params, updates), weight_masks)
        return params, opt_state
