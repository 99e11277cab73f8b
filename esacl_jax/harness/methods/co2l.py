"""CO2L (Cha, Lee and Shin, ICCV 2021, "Co2L: Contrastive Continual Learning"), after the official
code (github.com/chaht01/Co2L: main.py, losses_negative_only.py, main_linear_buffer.py).

Representation learning, every step (METHOD.md "CO2L"):
- The current batch and a replay minibatch drawn from the reservoir buffer are augmented twice
  (two views, `co2l_view`: random resized crop, optional flip and brightness/contrast jitter; the
  benchmark's own augmentation is not used) and go through the model's encoder (the input of
  its "classifier" layer: the penultimate features) and a projection head (Dense-ReLU-Dense,
  `projection_head` in the params, trained and counted), L2-normalised.
- Asymmetric supervised contrastive loss (`asym_supcon_loss`, the official SupConLoss of
  losses_negative_only.py): SupCon over all 2N rows, but only rows of the current task are
  anchors; replayed examples of earlier tasks serve as negatives (and positives of nothing but
  each other's rows, which are not anchors). Scaled by temperature / base_temperature and
  averaged over all 2N rows, as the official code does.
- Instance-wise relation distillation (`ird_loss`), from task 1 on: the cross-entropy between
  the past model's (frozen copy of encoder + head taken at the task's start, in method_state)
  softmax of similarities to the other rows at `past_temp` and the current model's at
  `current_temp`, over all 2N rows; weight `distill_power`. Exactly zero on task 0.
- Buffer: the harness's reservoir buffer (un-augmented inputs, labels, task ids; no logits), a
  separate replay minibatch every step. The official code instead keeps a class-balanced random
  subset of size mem_size chosen at each task start and mixes it into the task's dataset.

Evaluation: at every task end a linear classifier (fresh, torch's default init) is trained on
the frozen encoder's features of the task's training data and the buffer's examples of earlier
tasks, with class-balanced sampling (the official main_linear_buffer.py / main_ce_buffer.py:
WeightedRandomSampler with weights 1/count of the class, as many draws an epoch as examples),
SGD with momentum, step decays. It becomes the model's "classifier" layer, which evaluation uses
(`eval_variables`: the model's params, the head dropped). Deviation (`linear_augment=False`,
default): the features are computed once, without augmentation (the official script augments
every epoch; with it, 100 epochs of encoder forwards would cost several times the training).

Domain-IL: contrastive labels are (label, task) pairs (the official main_domain.py offsets
labels by the domain), anchors the current task's rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from esacl_jax import masks as masks_lib
from esacl_jax import replay
from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness import memory as memory_lib
from esacl_jax.harness.data.augment import brightness_contrast, random_flip, random_resized_crop
from esacl_jax.harness.data.base import preprocess
from esacl_jax.harness.methods.base import (
    Batch,
    Pass,
    StepMetrics,
    TaskContext,
    TrainState,
)
from esacl_jax.harness.methods.er import ReplayMethod
from esacl_jax.harness.methods.state import CO2LState
from esacl_jax.harness.models import forward, init_variables

HEAD = "projection_head"  # the params entry of the projection head
CLASSIFIER = "classifier"  # the model's output layer: the linear probe at evaluation


class ProjectionHead(nn.Module):
    """The official 'mlp' head: Dense(hidden) -> ReLU -> Dense(features) (normalised outside)."""

    hidden: int
    features: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(h))
        return nn.Dense(self.features, name="out")(h)


class Co2LAux(NamedTuple):
    """What a CO2L loss evaluation returns beside the loss and gradients (all stop-gradient)."""

    batch_stats: Any  # updated BatchNorm statistics ({} without BatchNorm)
    z: jax.Array  # [2N, D] normalised projections: view 1 of the N rows, then view 2
    labels: jax.Array  # int32 [N] class labels of the rows (current batch first, then replay)
    valid: jax.Array  # bool [N] (replay padding while the buffer fills is False)
    supcon: jax.Array  # the asymmetric SupCon term
    ird: jax.Array  # the IRD term before distill_power (0 on task 0)
    accuracy: jax.Array  # nearest-neighbour label agreement of the current rows (train metric)


# ----------------------------------------------------------------------------- pure pieces


def normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: z / max(||z||, eps) along the last axis, written as
    z / sqrt(max(||z||^2, eps^2)) so that its gradient at z = 0 is finite (a black crop, or the
    zero padding of a replay draw, can give a zero projection)."""
    squared = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def encode(model: nn.Module, params: Any, batch_stats: Any, x: jax.Array,
           train: bool) -> tuple[jax.Array, Any]:
    """(penultimate features, updated batch_stats): the input of the model's layer named
    "classifier", which is not run (every harness model names its output layer so)."""
    captured: list[jax.Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == CLASSIFIER:
            h = args[0]
            captured.append(h)
            return jnp.zeros((*h.shape[:-1], context.module.features), h.dtype)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        _, new_stats = forward(model, params, batch_stats, x, train=train)
    if len(captured) != 1:
        raise ValueError(f"CO2L needs a model with one layer named {CLASSIFIER!r} (its input is "
                         f"the encoder's output); {type(model).__name__} called it "
                         f"{len(captured)} times")
    return captured[0].astype(jnp.float32), new_stats


def _masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise log-softmax over the entries where `mask` holds (the others: 0, ignore them)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    shifted = jnp.where(mask, shifted, 0.0)
    lse = jnp.log(jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=1, keepdims=True))
    return jnp.where(mask, shifted - lse, 0.0)


def asym_supcon_loss(z: jax.Array, labels: jax.Array, anchors: jax.Array, valid: jax.Array,
                     temperature: float, base_temperature: float = 0.07) -> jax.Array:
    """Co2L's asymmetric supervised contrastive loss (losses_negative_only.SupConLoss).

    Args:
      z: [2N, D] L2-normalised features, view 1 of the N examples then view 2 (the official
        `torch.cat(torch.unbind(features, dim=1))` order).
      labels: [N] contrastive labels (examples with equal labels are positives).
      anchors: bool [N], the examples whose rows are anchors (the current task's).
      valid: bool [N]; invalid examples (replay padding) are neither anchors nor contrasted.
      temperature, base_temperature: the loss is -(temperature / base_temperature) * the mean
        log-probability of an anchor's positives.

    Returns:
      The sum over anchor rows of their loss divided by the number of valid rows (2 * valid
      examples): the official `loss.mean()` over all rows, non-anchors contributing 0.
    """
    n2 = z.shape[0]
    labels2 = jnp.concatenate([labels, labels])
    valid2 = jnp.concatenate([valid, valid]).astype(bool)
    rows = jnp.concatenate([anchors, anchors]).astype(bool) & valid2
    others = valid2[None, :] & ~jnp.eye(n2, dtype=bool)  # contrasted: valid, not self
    z = z.astype(jnp.float32)
    log_prob = _masked_log_softmax((z @ z.T) / temperature, others)
    positives = (labels2[:, None] == labels2[None, :]) & others
    mean_log_prob_pos = (jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1)
                         / jnp.maximum(jnp.sum(positives, axis=1), 1))
    per_row = -(temperature / base_temperature) * mean_log_prob_pos
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(valid2), 1)


def ird_loss(z_current: jax.Array, z_past: jax.Array, valid: jax.Array, current_temp: float,
             past_temp: float) -> jax.Array:
    """Instance-wise relation distillation (official main.py, "IRD (current)/(past)").

    For every valid row i: p_past(i, .) = softmax over the other valid rows j of
    z_past_i . z_past_j / past_temp (no gradient), p_cur the same of the current features at
    current_temp; the term is the mean over valid rows of sum_j -p_past(i, j) log p_cur(i, j).
    `z_*` are [2N, D] (both views), `valid` [N].
    """
    n2 = z_current.shape[0]
    valid2 = jnp.concatenate([valid, valid]).astype(bool)
    others = valid2[None, :] & ~jnp.eye(n2, dtype=bool)
    zc = z_current.astype(jnp.float32)
    zp = jax.lax.stop_gradient(z_past.astype(jnp.float32))
    log_p_cur = _masked_log_softmax((zc @ zc.T) / current_temp, others)
    p_past = jnp.exp(_masked_log_softmax((zp @ zp.T) / past_temp, others))
    per_row = -jnp.sum(jnp.where(others, p_past * log_p_cur, 0.0), axis=1)
    return jnp.sum(jnp.where(valid2, per_row, 0.0)) / jnp.maximum(jnp.sum(valid2), 1)


def neighbour_agreement(z: jax.Array, labels: jax.Array, valid: jax.Array,
                        rows: int) -> jax.Array:
    """Fraction of the first `rows` examples' rows (both views) whose nearest other valid row,
    their own other view excluded, has their label: the training metric CO2L reports."""
    n = labels.shape[0]
    n2 = 2 * n
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    labels2 = jnp.concatenate([labels, labels])
    valid2 = jnp.concatenate([valid, valid]).astype(bool)
    idx = jnp.arange(n2)
    twin = (idx[:, None] % n) == (idx[None, :] % n)  # self and its other view
    sims = jnp.where(valid2[None, :] & ~twin, z @ z.T, -jnp.inf)
    hit = labels2[jnp.argmax(sims, axis=1)] == labels2
    current = (idx % n) < rows
    return jnp.sum(hit & current) / (2 * rows)


# ----------------------------------------------------------------------------- the method


class CO2L(ReplayMethod):
    """Co2L: asymmetric SupCon + IRD on current + replay views; linear probe for evaluation."""

    name = "co2l"
    config_section = "co2l"
    scenarios = ("class_il", "domain_il")

    def __init__(self, config, model, benchmark):
        c = config.co2l
        for field in ("temperature", "base_temperature", "current_temp", "past_temp"):
            if c[field] <= 0:
                raise ValueError(f"co2l.{field} must be > 0, got {c[field]}")
        if c.distill_power < 0:
            raise ValueError(f"co2l.distill_power must be >= 0, got {c.distill_power}")
        if c.head_dim < 1 or c.head_hidden < 0:
            raise ValueError("co2l.head_dim must be >= 1 and co2l.head_hidden >= 0 (0: the "
                             f"encoder's width), got {c.head_dim} and {c.head_hidden}")
        if not 0.0 < c.crop_scale_min <= 1.0 or not 0.0 <= c.jitter < 1.0:
            raise ValueError("co2l.crop_scale_min must be in (0, 1] and co2l.jitter in [0, 1), "
                             f"got {c.crop_scale_min} and {c.jitter}")
        if c.linear_epochs < 0 or c.linear_batch_size < 1 or c.linear_lr <= 0:
            raise ValueError("co2l.linear_epochs must be >= 0, co2l.linear_batch_size >= 1 and "
                             "co2l.linear_lr > 0")
        self.co = c
        super().__init__(config, model, benchmark)
        self.domain = benchmark.scenario == "domain_il"
        shapes = jax.eval_shape(lambda k: init_variables(model, k, jnp.zeros(
            (1, *benchmark.input_shape), jnp.float32)), jax.random.key(0))
        model_params, model_stats = shapes
        if CLASSIFIER not in model_params:
            raise ValueError(f"CO2L needs a model whose output layer is named {CLASSIFIER!r}")
        self.encoder_modules = tuple(sorted(k for k in model_params if k != CLASSIFIER))
        self.trained_modules = (*self.encoder_modules, HEAD)
        feats = jax.eval_shape(lambda p, s: encode(model, p, s, jnp.zeros(
            (1, *benchmark.input_shape), jnp.float32), False)[0], model_params, model_stats)
        self.feature_dim = int(feats.shape[-1])
        self.head = ProjectionHead(hidden=int(c.head_hidden) or self.feature_dim,
                                   features=int(c.head_dim))
        self.rows = 2 * (config.batch_size + self.replay_batch_size)  # views x (batch + replay)
        self._features = jax.jit(lambda p, s, x: encode(
            model, p, s, preprocess(x, benchmark.mean, benchmark.std), False)[0])
        self._fit_probe = jax.jit(self._train_probe)
        self._probe_examples: int | None = None  # set by end_task, read by end_task_passes

    # ----- state -----
    def init_params(self, key: jax.Array) -> tuple[Any, Any]:
        params, batch_stats = super().init_params(key)
        head = self.head.init(jax.random.fold_in(key, 1),
                              jnp.zeros((1, self.feature_dim), jnp.float32))["params"]
        return {**params, HEAD: head}, batch_stats

    def trained(self, params: Any) -> Any:
        """The encoder and projection head (what the past-model copy keeps)."""
        return {k: v for k, v in params.items() if k != CLASSIFIER}

    def init_method_state(self, params: Any) -> Any:
        x_dtype = self.benchmark.tasks[0].x_train.dtype
        buffer = replay.init_buffer(self.buffer_size, self.benchmark.input_shape,
                                    np.dtype(x_dtype), 0)  # no logits to store
        past = jax.tree.map(lambda w: jnp.array(w, copy=True), self.trained(params))
        return CO2LState(buffer=buffer, past_params=past)

    def begin_task(self, state: TrainState, task_id: int) -> TrainState:
        """The official `model2 = copy.deepcopy(model)` at every task start."""
        state = super().begin_task(state, task_id)
        past = jax.tree.map(lambda w: jnp.array(w, copy=True), self.trained(state.params))
        return state.replace(method_state=state.method_state._replace(past_params=past))

    def prunable_tree(self, params: Any, prunable: Any) -> Any:
        """Prunable flags of params with the head (for SparCL-CO2L): the model's set from
        `prunable` on the model's params alone (the head would change which layer the structural
        set takes for the logits layer), and the head's kernels when co2l.prune_head holds under
        a structural set, or as a name filter says (`prunable="by_layer_name"` keeps them
        dense)."""
        model_params = {k: v for k, v in params.items() if k != HEAD}
        flags = dict(masks_lib.prunable_tree(model_params, prunable))
        if callable(prunable) or prunable == "by_layer_name":
            head_flags = masks_lib.prunable_tree({HEAD: params[HEAD]}, prunable)[HEAD]
        else:
            head_flags = jax.tree.map(lambda w: bool(self.co.prune_head and np.ndim(w) >= 2),
                                      params[HEAD])
        return {**flags, HEAD: head_flags}

    # ----- the compiled step -----
    def view(self, key: jax.Array, x_raw: jax.Array) -> jax.Array:
        """One augmented, normalised view of compact inputs (random resized crop, then the
        optional flip and brightness/contrast jitter)."""
        c, b = self.co, self.benchmark
        crop_key, flip_key, jitter_key = jax.random.split(key, 3)
        x = random_resized_crop(crop_key, x_raw, scale=(float(c.crop_scale_min), 1.0))
        if c.flip:
            x = random_flip(flip_key, x)
        if c.jitter > 0:
            x = brightness_contrast(jitter_key, x, float(c.jitter))
        return preprocess(x, b.mean, b.std)

    def project(self, params: Any, batch_stats: Any, x: jax.Array,
                train: bool) -> tuple[jax.Array, Any]:
        """(L2-normalised projections, updated batch_stats) of preprocessed inputs."""
        h, new_stats = encode(self.model, {k: v for k, v in params.items() if k != HEAD},
                              batch_stats, x, train)
        return normalize(self.head.apply({"params": params[HEAD]}, h)), new_stats

    def loss_and_grads(self, state: TrainState, batch: Batch, ctx: TaskContext,
                       key: jax.Array) -> tuple[jax.Array, Any, Co2LAux]:
        """The CO2L loss of one step (current batch + one replay draw, two views each), its
        gradient with respect to state.params, and `Co2LAux`."""
        c = self.co
        draw_key, key1, key2 = jax.random.split(key, 3)
        rx, ry, _, rtask, rvalid = replay.sample(state.method_state.buffer, draw_key,
                                                 self.replay_batch_size)
        b = batch.y.shape[0]
        x_raw = jnp.concatenate([batch.x_raw, rx.astype(batch.x_raw.dtype)])
        y = jnp.concatenate([batch.y.astype(jnp.int32), ry])
        task = jnp.concatenate([jnp.full((b,), ctx.task_id, jnp.int32), rtask])
        valid = jnp.concatenate([jnp.ones((b,), bool), rvalid])
        anchors = task == ctx.task_id
        labels = y + self.num_classes * task if self.domain else y
        x = jnp.concatenate([self.view(key1, x_raw), self.view(key2, x_raw)])

        def past_projections():
            z, _ = self.project(state.method_state.past_params, state.batch_stats, x,
                                train=True)  # the official copy runs in train mode, no grad
            return jax.lax.stop_gradient(z)

        distill = ctx.task_id > 0
        z_past = jax.lax.cond(distill, past_projections,
                              lambda: jnp.zeros((x.shape[0], c.head_dim), jnp.float32))

        def loss_fn(params):
            z, new_stats = self.project(params, state.batch_stats, x, train=True)
            supcon = asym_supcon_loss(z, labels, anchors, valid, c.temperature,
                                      c.base_temperature)
            ird = jnp.where(distill, ird_loss(z, z_past, valid, c.current_temp, c.past_temp),
                            0.0)
            return supcon + c.distill_power * ird, (z, new_stats, supcon, ird)

        (loss, (z, new_stats, supcon, ird)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        z = jax.lax.stop_gradient(z)
        aux = Co2LAux(batch_stats=new_stats, z=z, labels=y, valid=valid, supcon=supcon, ird=ird,
                      accuracy=neighbour_agreement(z, labels, valid, b))
        return loss, grads, aux

    def after_step(self, state: TrainState, batch: Batch, ctx: TaskContext, logits: Any,
                   per_example_loss: Any, key: jax.Array) -> Any:
        """Reservoir insertion of the un-augmented batch (no logits: CO2L has none)."""
        del logits, per_example_loss
        buffer = replay.add_reservoir(state.method_state.buffer, key, batch.x_raw, batch.y,
                                      None, ctx.task_id)
        return state.method_state._replace(buffer=buffer)

    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        loss_key, after_key = jax.random.split(key)
        loss, grads, aux = self.loss_and_grads(state, batch, ctx, loss_key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        method_state = self.after_step(state, batch, ctx, None, None, after_key)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=aux.batch_stats, opt_state=opt_state,
                                  method_state=method_state)
        return new_state, StepMetrics(loss, aux.accuracy)

    # ----- the linear classifier at task end -----
    def probe_data(self, state: TrainState, task_id: int, x: np.ndarray,
                   y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The classifier's training set: the task's data and the buffer's examples of earlier
        tasks (the official replay samples of the task: previous tasks only)."""
        buffer = jax.device_get(state.method_state.buffer)
        filled = min(int(buffer.num_seen), replay.capacity(buffer))
        keep = np.flatnonzero(np.asarray(buffer.task_id)[:filled] < task_id)
        xb = np.asarray(buffer.x)[keep].astype(x.dtype)
        yb = np.asarray(buffer.y)[keep]
        return np.concatenate([x, xb]), np.concatenate([y.astype(np.int32), yb.astype(np.int32)])

    def _train_probe(self, key: jax.Array, params: Any, batch_stats: Any, feats: jax.Array,
                     x_raw: jax.Array, y: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(kernel, bias) of the linear classifier trained on the first `n` rows (feats: cached
        features, or x_raw augmented every step when co2l.linear_augment), as the official
        main_linear_buffer.py: class-balanced draws with replacement, `n` an epoch in batches
        of linear_batch_size (the last one partial), SGD + momentum, lr x decay_rate after
        each of linear_decay_epochs (1-based epochs > e), cross-entropy over all classes."""
        c = self.co
        cap, k = y.shape[0], self.num_classes
        bs = int(c.linear_batch_size)
        steps_max = -(-cap // bs)
        real = jnp.arange(cap) < n
        counts = jnp.zeros((k,), jnp.float32).at[y].add(real.astype(jnp.float32))
        weights = jnp.where(real, 1.0 / jnp.maximum(counts[y], 1.0), 0.0)
        cdf = jnp.cumsum(weights)
        cdf = cdf / cdf[-1]
        init_key, run_key = jax.random.split(key)
        bound = 1.0 / math.sqrt(self.feature_dim)  # torch nn.Linear's default init
        wk, bk = jax.random.split(init_key)
        kernel = jax.random.uniform(wk, (self.feature_dim, k), jnp.float32, -bound, bound)
        bias = jax.random.uniform(bk, (k,), jnp.float32, -bound, bound)
        decay_epochs = jnp.asarray(tuple(c.linear_decay_epochs) or (10**9,), jnp.int32)
        steps = (n + bs - 1) // bs

        def loss_fn(w, rows_x, rows_y, rows_ok):
            logits = rows_x @ w[0] + w[1]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows_y)
            return jnp.sum(jnp.where(rows_ok, ce, 0.0)) / jnp.maximum(jnp.sum(rows_ok), 1)

        def epoch_body(epoch, carry):
            w, mom = carry
            lr = c.linear_lr * c.linear_decay_rate ** jnp.sum(epoch + 1 > decay_epochs)
            ekey = jax.random.fold_in(run_key, epoch)
            u = jax.random.uniform(ekey, (steps_max * bs,))
            draws = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), cap - 1)

            def step_body(s, carry):
                w, mom = carry
                idx = jax.lax.dynamic_slice(draws, (s * bs,), (bs,))
                ok = s * bs + jnp.arange(bs) < n
                if c.linear_augment:
                    skey = jax.random.fold_in(ekey, s)
                    rows = encode(self.model, params, batch_stats,
                                  self.view(skey, x_raw[idx]), False)[0]
                else:
                    rows = feats[idx]
                g = jax.grad(loss_fn)(w, rows, y[idx], ok)
                mom = jax.tree.map(lambda m, gi: c.linear_momentum * m + gi, mom, g)
                w = jax.tree.map(lambda wi, m: wi - lr * m, w, mom)
                return w, mom

            return jax.lax.fori_loop(0, steps, step_body, (w, mom))

        w = (kernel, bias)
        mom = jax.tree.map(jnp.zeros_like, w)
        w, _ = jax.lax.fori_loop(0, int(c.linear_epochs), epoch_body, (w, mom))
        return w

    def end_task(self, state: TrainState, task_id: int, x: np.ndarray, y: np.ndarray) -> TrainState:
        """Trains the linear classifier on the frozen encoder and puts it in the params."""
        xs, ys = self.probe_data(state, task_id, x, y)
        n = int(xs.shape[0])
        self._probe_examples = n
        chunk = int(self.config.eval_batch_size)
        # One shape for every task (one compilation): the largest task plus a full buffer.
        cap = max(n, max(t.num_train for t in self.benchmark.tasks) + self.buffer_size)
        cap = -(-cap // chunk) * chunk
        xs = np.concatenate([xs, np.zeros((cap - n, *xs.shape[1:]), xs.dtype)])
        ys = np.concatenate([ys, np.zeros((cap - n,), np.int32)])
        model_params = {k: v for k, v in state.params.items() if k != HEAD}
        if self.co.linear_augment:
            feats = jnp.zeros((cap, self.feature_dim), jnp.float32)
        else:  # the frozen encoder's features, once (eval mode, no augmentation)
            parts = [self._features(model_params, state.batch_stats, xs[i:i + chunk])
                     for i in range(0, -(-n // chunk) * chunk, chunk)]
            feats = jnp.concatenate(parts + [jnp.zeros((cap - len(parts) * chunk,
                                                        self.feature_dim), jnp.float32)])
        key = jax.random.fold_in(jax.random.fold_in(state.rng, 3_000_017), task_id)
        kernel, bias = self._fit_probe(key, model_params, state.batch_stats, feats,
                                       jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(n))
        old = state.params[CLASSIFIER]
        classifier = {"kernel": kernel.astype(old["kernel"].dtype),
                      "bias": bias.astype(old["bias"].dtype)}
        return state.replace(params={**state.params, CLASSIFIER: classifier})

    def eval_variables(self, state: TrainState) -> tuple[Any, Any]:
        """The model (encoder + the linear classifier of the last task end); no head."""
        return {k: v for k, v in state.params.items() if k != HEAD}, state.batch_stats

    # ----- accounting -----
    def flops_layers(self, params: Any, batch_stats: Any) -> list[flops_lib.LayerFlops]:
        """The model's layers and the projection head's (paths "projection_head/...")."""
        model_layers = super().flops_layers({k: v for k, v in params.items() if k != HEAD},
                                            batch_stats)
        head_layers = flops_lib.layer_forward_flops(
            self.head, {"params": params[HEAD]}, jnp.zeros((1, self.feature_dim), jnp.float32),
            apply_kwargs={})
        return model_layers + [dataclasses.replace(layer, path=f"{HEAD}/{layer.path}")
                               for layer in head_layers]

    def step_passes(self) -> list[Pass]:
        """Two views of batch + replay through encoder and head, forward and backward; the past
        model's forward on the same rows (from task 1 on: `step_passes_for_task`)."""
        return [Pass("fwd_bwd", self.rows, self.trained_modules),
                Pass("fwd", self.rows, self.trained_modules)]

    def step_passes_for_task(self, task_id: int) -> list[Pass]:
        passes = self.step_passes()
        return passes if task_id > 0 else passes[:1]

    def end_task_passes(self, num_examples: int) -> list[Pass]:
        """The linear classifier: the encoder's forward on its training set (once, or every
        epoch with linear_augment) and linear_epochs epochs of the classifier's forward and
        backward (counted as a full fwd_bwd: the unneeded input gradient is a third of it)."""
        n = self._probe_examples if self._probe_examples is not None else num_examples
        epochs = int(self.co.linear_epochs)
        encoder = Pass("fwd", n * (epochs if self.co.linear_augment else 1),
                       self.encoder_modules)
        return [encoder, Pass("fwd_bwd", n * epochs, (CLASSIFIER,))]

    def summary(self, state: TrainState) -> dict:
        """The linear classifier's training-set size (task data + the buffer's earlier tasks)."""
        del state
        return {"linear_classifier_examples": self._probe_examples}

    def step_activation_bytes(self, state: TrainState, per_example: int, batch_size: int) -> int:
        """Both views of batch + replay, through the model and the projection head."""
        del batch_size
        head = memory_lib.activation_bytes_per_example(
            self.head, {"params": state.params[HEAD]},
            jnp.zeros((1, self.feature_dim), jnp.float32), apply_kwargs={})
        head -= 4 * self.feature_dim  # its input is the model's, counted already
        return (per_example + head) * self.rows


__all__ = ["CO2L", "Co2LAux", "ProjectionHead", "asym_supcon_loss", "encode", "ird_loss",
           "neighbour_agreement", "normalize"]
