"""Every way a user's own loop could go quietly wrong with the library is refused or made right.

Each test is a composition a user can write (issue: "EsaCL from the library with no silent
failure"): it either does what it says (checked against a reference) or fails at trace time with
one sentence naming the fix.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esacl_jax
from esacl_jax import masks, sdp
from tests.test_esacl_lib import init_params, loss_fn, make_batch, rows


def _esacl_steps(tx, steps: int = 4, *, params=None, grad_kwargs=None, batch=None):
    """`steps` EsaCL steps (variant C, table) of `tx` from the sparse start: final params."""
    params = init_params() if params is None else params
    batch = make_batch() if batch is None else batch
    opt_state = tx.init(params)
    params = esacl_jax.sparse_start(params, opt_state)
    table = esacl_jax.init_example_stats(16)

    @jax.jit
    def step(params, opt_state, table):
        g = esacl_jax.esacl_gradients(loss_fn, params, rows(batch), opt_state, table=table,
                                      example_index=batch["index"], **(grad_kwargs or {}))
        updates, opt_state = tx.update(g.ascent_grads, opt_state, params, grad_fn=g.grad_fn)
        return optax.apply_updates(params, updates), opt_state, g.table

    for _ in range(steps):
        params, opt_state, table = step(params, opt_state, table)
    return params, opt_state


def _equal(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ----------------------------------------------------------------------------- 1. one rho


def test_esacl_gradients_takes_rho_from_the_optimizer():
    p_half, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=0.5))
    p_default, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1)))
    p_both, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=0.5),
                             grad_kwargs={"rho": 0.5})
    assert not _equal(p_half, p_default)   # rho 0.5 reaches the step ...
    assert _equal(p_half, p_both)          # ... exactly as if given in both places


def test_a_second_rho_or_perturbation_dtype_is_refused():
    with pytest.raises(ValueError, match=r"differs from the optimizer's rho \(0.5\)"):
        _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=0.5),
                     grad_kwargs={"rho": 0.01})
    with pytest.raises(ValueError, match="perturbation_dtype"):
        _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1)),
                     grad_kwargs={"perturbation_dtype": "bfloat16"})


def test_rho_schedule_is_evaluated_at_the_same_step_in_both_places():
    schedule = optax.linear_schedule(0.0, 0.4, 4)
    tx = esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=schedule)
    p_sched, state = _esacl_steps(tx, steps=3)
    assert float(esacl_jax.sam_radius(state)) == pytest.approx(0.3)   # count 3 -> 0.3
    # By hand: three steps with rho 0.0, 0.1, 0.2 (a constant-rho optimizer per step, the masks
    # and score averages carried over).
    params = init_params()
    batch = make_batch()
    opt_state = esacl_jax.esacl_optimizer(optax.sgd(0.1)).init(params)
    params = esacl_jax.sparse_start(params, opt_state)
    table = esacl_jax.init_example_stats(16)
    for rho in (0.0, 0.1, 0.2):
        tx_r = esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=rho)
        opt_state = sdp.replace_sdp_state(opt_state,
                                          sdp.find_sdp_state(opt_state)._replace(rho=rho))
        g = esacl_jax.esacl_gradients(loss_fn, params, rows(batch), opt_state, table=table,
                                      example_index=batch["index"])
        updates, opt_state = tx_r.update(g.ascent_grads, opt_state, params, grad_fn=g.grad_fn)
        params, table = optax.apply_updates(params, updates), g.table
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 p_sched, params)


# ----------------------------------------------------------------------------- 2, 3. chains


@pytest.mark.parametrize("outer", [
    lambda inner: optax.chain(optax.clip_by_global_norm(1e-3), inner),
    lambda inner: optax.chain(optax.scale(0.5), inner),
    lambda inner: optax.named_chain(("clip", optax.clip_by_global_norm(1e-3)), ("esacl", inner)),
])
def test_a_transform_before_the_optimizer_is_refused(outer):
    with pytest.raises(ValueError, match="runs before keep_sparse"):
        _esacl_steps(outer(esacl_jax.esacl_optimizer(optax.sgd(0.1))), steps=1)
    tx = outer(esacl_jax.keep_sparse(optax.chain(esacl_jax.sdp_transform(0.5, 0.05),
                                                 optax.sgd(0.1))))
    with pytest.raises(ValueError, match="runs before keep_sparse"):
        _esacl_steps(tx, steps=1)


@pytest.mark.parametrize("every", [0, 2])
def test_a_transform_after_keep_sparse_is_refused(every):
    inner = esacl_jax.esacl_optimizer(optax.sgd(0.1), mask_update_every_steps=every)
    for tx in (optax.chain(inner, optax.scale(0.5)),
               optax.chain(inner, optax.trace(0.9)),
               optax.named_chain(("esacl", inner), ("scale", optax.scale(0.5)))):
        with pytest.raises(ValueError, match="runs after keep_sparse"):
            _esacl_steps(tx, steps=1)


def test_the_fix_the_messages_name_works_and_stays_sparse():
    """Clipping and scaling inside, after sdp_transform: pruned weights stay exactly zero while
    masks change inside update, and the clipping acts."""
    inner = lambda *extra: esacl_jax.keep_sparse(optax.chain(  # noqa: E731
        esacl_jax.sdp_transform(0.9, 0.05, mask_update_every_steps=2, prune_fraction=0.2),
        *extra, optax.sgd(0.1)))
    p_clip, state = _esacl_steps(inner(optax.clip_by_global_norm(1e-3), optax.scale(0.5)), 6)
    p_plain, _ = _esacl_steps(inner(), 6)
    assert not _equal(p_clip, p_plain)
    m = esacl_jax.find_sdp_state(state).masks
    for w, mask in zip(jax.tree.leaves(p_clip), jax.tree.leaves(m), strict=True):
        if jnp.ndim(mask):
            assert bool(jnp.all(w[~mask] == 0))
    # A lone chain around the optimizer is fine.
    _esacl_steps(optax.chain(esacl_jax.esacl_optimizer(optax.sgd(0.1))), steps=1)


def test_multisteps_inside_is_refused():
    with pytest.raises(ValueError, match="MultiSteps inside keep_sparse"):
        esacl_jax.esacl_optimizer(optax.MultiSteps(optax.sgd(0.1), 4))
    with pytest.raises(ValueError, match="MultiSteps inside keep_sparse"):
        esacl_jax.esacl_optimizer(optax.MultiSteps(optax.sgd(0.1), 4).gradient_transformation())
    tx = esacl_jax.keep_sparse(optax.chain(
        esacl_jax.sdp_transform(0.5, 0.05),
        optax.MultiSteps(optax.sgd(0.1), 4).gradient_transformation()))
    with pytest.raises(ValueError, match="MultiSteps inside keep_sparse"):
        tx.init(init_params())


def test_multisteps_around_is_refused():
    tx = optax.MultiSteps(esacl_jax.esacl_optimizer(optax.sgd(0.1)), 4)
    with pytest.raises(ValueError, match="MultiSteps"):
        _esacl_steps(tx, steps=1)


# ----------------------------------------------------------------------------- 4. IDS indices


def test_global_row_ids_are_refused_at_once_when_concrete():
    batch = make_batch()
    batch["index"] = batch["index"] + 60_000  # a user's global dataset row ids
    tx = esacl_jax.esacl_optimizer(optax.sgd(0.1))
    params = init_params()
    state = tx.init(params)
    with pytest.raises(ValueError, match="capacity 16 .largest 60015."):
        esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state,
                                  table=esacl_jax.init_example_stats(16),
                                  example_index=batch["index"])


def test_global_row_ids_warn_under_jit_naming_the_capacity():
    batch = make_batch()
    params = init_params()
    state = esacl_jax.esacl_optimizer(optax.sgd(0.1)).init(params)
    table = esacl_jax.init_example_stats(16)

    @jax.jit
    def step(index):  # traced indices: checked when the step runs
        return esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state, table=table,
                                         example_index=index).table

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(batch["index"])  # in range: no warning
        jax.effects_barrier()
    with pytest.warns(UserWarning, match=r"capacity 16 \(largest 60015\)"):
        new = step(batch["index"] + 60_000)  # a user's global dataset row ids
        jax.effects_barrier()
    assert int(new.seen.sum()) == 0


def test_in_range_and_padding_indices_do_not_warn():
    batch = make_batch()
    batch["index"] = batch["index"].at[-3:].set(-1)   # three padding rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1)), steps=2, batch=batch)
        jax.effects_barrier()
    table = esacl_jax.init_example_stats(16)
    positions = esacl_jax.ids.table_positions(table, batch["index"])
    assert positions.tolist()[-3:] == [16, 16, 16]  # past the end: never recorded nor chosen


# ----------------------------------------------------------------------------- 5. hyperparams


def test_inject_hyperparams_around_esacl_optimizer():
    plain, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=0.2))
    injected_tx = optax.inject_hyperparams(esacl_jax.esacl_optimizer,
                                           static_args=esacl_jax.STATIC_ARGS)(
        optax.sgd(0.1), rho=0.2)
    injected, state = _esacl_steps(injected_tx)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 plain, injected)
    assert sorted(state.hyperparams) == ["ema_decay", "mask_update_every_steps",
                                         "prune_fraction", "rho", "score_lambda"]


def test_injected_rho_changed_by_the_user_reaches_the_step():
    """Setting the hyperparameter in the state changes the rho of the next step in the
    transform and in esacl_gradients alike (sam_radius reads the wrapper's state)."""
    tx = optax.inject_hyperparams(esacl_jax.esacl_optimizer, static_args=esacl_jax.STATIC_ARGS)(
        optax.sgd(0.1), rho=0.01)
    params = init_params()
    state = tx.init(params)
    state.hyperparams["rho"] = jnp.asarray(0.3, jnp.float32)
    assert float(esacl_jax.sam_radius(state)) == pytest.approx(0.3)
    batch = make_batch()
    start = esacl_jax.sparse_start(params, state)
    g = esacl_jax.esacl_gradients(loss_fn, start, rows(batch), state,
                                  table=esacl_jax.init_example_stats(16),
                                  example_index=batch["index"])
    ref_state = esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=0.3).init(params)
    ref = esacl_jax.esacl_gradients(loss_fn, start, rows(batch), ref_state,
                                    table=esacl_jax.init_example_stats(16),
                                    example_index=batch["index"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 g.descent_grads, ref.descent_grads)


def test_inject_hyperparams_without_static_args_names_the_supported_form():
    for factory in (esacl_jax.esacl_optimizer, None):
        if factory is None:
            tx = esacl_jax.keep_sparse(optax.chain(
                optax.inject_hyperparams(esacl_jax.sdp_transform)(rho=0.05), optax.sgd(0.1)))
        else:
            tx = optax.inject_hyperparams(factory)(optax.sgd(0.1))
        with pytest.raises(ValueError, match="static_args=esacl_jax.STATIC_ARGS"):
            tx.init(init_params())


def test_rho_scheduled_by_inject_hyperparams_is_refused_by_the_step():
    tx = optax.inject_hyperparams(esacl_jax.esacl_optimizer, static_args=esacl_jax.STATIC_ARGS)(
        optax.sgd(0.1), rho=optax.linear_schedule(0.0, 0.1, 10))
    with pytest.raises(ValueError, match=r"esacl_optimizer\(optimizer, rho=schedule\)"):
        _esacl_steps(tx, steps=1)


def test_learning_rate_schedules_go_through_the_optimizer():
    schedule = optax.linear_schedule(0.1, 0.0, 3)
    p_sched, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(schedule)), steps=3)
    p_inject, state = _esacl_steps(esacl_jax.esacl_optimizer(
        optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)), steps=3)
    p_const, _ = _esacl_steps(esacl_jax.esacl_optimizer(optax.sgd(0.1)), steps=3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_sched, p_inject)
    assert not _equal(p_sched, p_const)


# ----------------------------------------------------------------------------- 6. heads


def test_every_head_of_a_multi_head_model_stays_dense():
    key = jax.random.key(0)
    params = {"trunk1": {"kernel": jax.random.normal(key, (784, 100))},
              "trunk2": {"kernel": jax.random.normal(key, (100, 100))}}
    params.update({f"head{t}": {"kernel": jax.random.normal(key, (100, 2)),
                                "bias": jnp.zeros(2)} for t in range(5)})
    flags = masks.prunable_tree(params)
    assert flags["trunk1"]["kernel"] and flags["trunk2"]["kernel"]
    assert not any(flags[f"head{t}"]["kernel"] for t in range(5))
    # And a single-head MLP keeps only its logits layer dense, as before.
    single = masks.prunable_tree(init_params())
    assert [single[n]["kernel"] for n in ("layer1", "layer2", "logits")] == [True, True, False]


# ----------------------------------------------------------------------------- 7. names


def test_deprecated_names_warn_and_still_work():
    params = init_params()
    state = esacl_jax.esacl_optimizer(optax.sgd(0.1)).init(params)
    m = esacl_jax.find_sdp_state(state).masks
    summary = esacl_jax.sparsity_summary(m, params=params)
    with pytest.warns(DeprecationWarning, match="prunable_sparsity"):
        assert summary["global_sparsity"] == summary["prunable_sparsity"]
    with pytest.warns(DeprecationWarning, match="sparse_start"):
        old = esacl_jax.sparse_init(params, m)
    assert _equal(old, esacl_jax.sparse_start(params, state))
    with pytest.warns(DeprecationWarning, match="name_prunable"):
        assert esacl_jax.default_prunable is masks.name_prunable
    batch = make_batch()
    g = esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state)
    with pytest.warns(DeprecationWarning, match="ascent_grads"):
        assert g.grads is g.ascent_grads
    assert "sparse_init" not in esacl_jax.__all__ and "default_prunable" not in esacl_jax.__all__


def test_esacl_optimizer_is_keyword_only_and_names_every_option():
    import inspect

    signature = inspect.signature(esacl_jax.esacl_optimizer).parameters
    kinds = {name: p.kind for name, p in signature.items()}
    assert kinds.pop("optimizer") == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}
    transform = set(inspect.signature(esacl_jax.sdp_transform).parameters)
    assert set(kinds) == transform - {"check_projection", "require_grad_fn"}
    with pytest.raises(TypeError):
        esacl_jax.esacl_optimizer(optax.sgd(0.1), 0.9)


# ----------------------------------------------------------------------------- grad_fn


def test_grad_fn_of_another_structure_gives_one_line():
    params = init_params()
    tx = esacl_jax.esacl_optimizer(optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    wrong = lambda p: {"wrapped": jax.tree.map(jnp.ones_like, p)}  # noqa: E731
    with pytest.raises(ValueError, match=r"grad_fn returned a tree of another structure.*"
                                         r"nnx.as_pure"):
        tx.update(grads, state, params, grad_fn=wrong)


def test_sam_radius_of_a_bare_array_rho_is_refused():
    tx = esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=jnp.asarray(0.05))
    state = tx.init(init_params())
    with pytest.raises(ValueError, match="Python float or a schedule"):
        sdp.sam_radius(state)


def test_public_face_renames_warn_and_forward():
    """Issue 31: the top level is the composing API; every name moved into a family namespace
    or renamed still resolves for one release, with a DeprecationWarning naming the new one."""
    from esacl_jax import ids, metrics, replay

    assert len(esacl_jax.__all__) <= 30
    for family in ("masks", "ids", "replay", "metrics", "sharpness"):
        assert family in esacl_jax.__all__
    moved = {"sample": replay.sample, "num_filled": replay.num_filled,
             "magnitude_masks": masks.magnitude_masks, "summarize_run": metrics.summarize_run,
             "keep_top": masks.top_mask, "select_top": ids.select_examples,
             "summarize": metrics.summarize_matrix, "update_masks": sdp.mask_update,
             "DEFAULTS": esacl_jax.ESACL_DEFAULTS}
    for old, new in moved.items():
        assert old not in esacl_jax.__all__
        with pytest.warns(DeprecationWarning, match=f"esacl_jax.{old} is deprecated"):
            assert getattr(esacl_jax, old) is new
    for module, old, new in ((masks, "keep_top", masks.top_mask),
                             (ids, "select_top", ids.select_examples),
                             (metrics, "summarize", metrics.summarize_matrix),
                             (sdp, "update_masks", sdp.mask_update)):
        with pytest.warns(DeprecationWarning, match=new.__name__):
            assert getattr(module, old) is new
    with pytest.raises(AttributeError):
        esacl_jax.no_such_name  # noqa: B018


@pytest.mark.parametrize("old,new", [("structural", "all_but_output"),
                                     ("sparcl", "all_but_input_and_output"),
                                     ("name", "by_layer_name")])
def test_old_prunable_spellings_warn_and_select_the_same_set(old, new):
    params = init_params()
    with pytest.warns(DeprecationWarning, match=f'prunable="{new}"') as record:
        assert masks.prunable_tree(params, old) == masks.prunable_tree(params, new)
    assert record[0].filename == __file__  # the warning points at the caller's line
    with pytest.raises(ValueError, match="all_but_output"):
        masks.prunable_tree(params, "all")
