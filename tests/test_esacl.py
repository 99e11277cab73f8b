"""EsaCL in the continual loop: learning happens, sparsity is exact, the variants all run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from esacl_jax import masks, sdp
from esacl_jax.harness.loop import (
    build_config_method,
    build_model_for,
    load_config_benchmark,
    train_and_evaluate,
)
from esacl_jax.harness.methods import Pass, build_method
from experiments.configs import split_digits, split_mnist

DIGITS_TASK0 = 269  # training examples of split_digits' first task (classes 0 and 1)


def esacl_config(sparse_start: str = "magnitude", **esacl_overrides):
    config = split_digits.get_config("esacl")
    config.progress = False
    config.tensorboard = False
    config.sparse_start = sparse_start
    config.esacl.update(esacl_overrides)
    return config


def final_state(config, tmp_path):
    """Runs the loop; returns (result, method, state after the last task)."""
    captured = {}

    def capture(task_id, method, state):
        captured["method"], captured["state"] = method, state

    result = train_and_evaluate(config, tmp_path, progress=False, on_task_end=capture)
    return result, captured["method"], captured["state"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    # 5 epochs per task: mask updates at epochs 2 and 4
    config = esacl_config(mask_update_every_epochs=2)
    return final_state(config, tmp_path_factory.mktemp("esacl"))


def test_esacl_learns_and_beats_finetune(default_run):
    result, _, _ = default_run
    class_il = result["metrics"]["class_il"]["average_accuracy"]
    task_il = result["metrics"]["task_il"]["average_accuracy"]
    # finetune on split_digits ends near 20% class-IL (see test_train); replay + SDP must do
    # far better, and every task must be learned when trained.
    assert class_il > 0.6, class_il
    assert task_il > 0.9, task_il
    assert np.diag(np.asarray(result["task_il_matrix"])).min() > 0.9


def test_final_model_has_the_configured_sparsity_and_zero_pruned_weights(default_run):
    result, method, state = default_run
    sdp_state = sdp.find_sdp_state(state.opt_state)
    prunable = masks.prunable_tree(state.params)
    summary = masks.sparsity_summary(sdp_state.masks, prunable)
    assert summary["prunable_sparsity"] == pytest.approx(0.9, abs=1e-9)
    for layer in summary["layers"].values():
        assert layer["active"] == round(0.1 * layer["size"])
    kernel = np.asarray(state.params["hidden_1"]["kernel"])
    mask = np.asarray(sdp_state.masks["hidden_1"]["kernel"])
    assert np.all(kernel[~mask] == 0.0)
    assert np.count_nonzero(kernel) <= mask.sum()
    # The sparsity is recorded per task in results.json.
    assert result["per_task"][-1]["sparsity"]["prunable_sparsity"] == pytest.approx(0.9)


def test_sdp_moves_the_mask_across_tasks(tmp_path):
    """With SDP the mask changes at task starts; with sdp=False it stays the init mask."""
    def last_mask(config, path):
        _, _, state = final_state(config, path)
        return np.asarray(sdp.find_sdp_state(state.opt_state).masks["hidden_1"]["kernel"])

    config = esacl_config(prune_fraction=0.05)
    config.num_tasks, config.epochs = 3, 1
    moved = last_mask(config, tmp_path / "sdp")
    fixed_config = esacl_config(sdp=False)
    fixed_config.num_tasks, fixed_config.epochs = 3, 1
    fixed = last_mask(fixed_config, tmp_path / "fixed")
    assert moved.sum() == fixed.sum()  # same exact sparsity
    # Two task starts, 5% of the 100x100 layer pruned and regrown at each: the masks differ.
    assert np.count_nonzero(moved != fixed) > 0


def test_rescaled_start_keeps_each_hidden_units_dense_norm():
    """The sparse start keeps the dense init's incoming norm per unit (sparse_start=rescaled)."""
    config = esacl_config(sparse_start="rescaled")
    benchmark = load_config_benchmark(config)
    _, method = build_config_method(config, benchmark)
    key = jax.random.key(0)
    dense = super(type(method), method).init(key).params["hidden_1"]["kernel"]
    sparse = method.init(key)
    kernel = np.asarray(sparse.params["hidden_1"]["kernel"])
    mask = np.asarray(sdp.find_sdp_state(sparse.opt_state).masks["hidden_1"]["kernel"])
    assert np.all(kernel[~mask] == 0.0) and mask.mean() == pytest.approx(0.1)
    alive = mask.any(0)
    np.testing.assert_allclose((kernel**2).sum(0)[alive], (np.asarray(dense)**2).sum(0)[alive],
                               rtol=1e-5)
    # Without it, the kept weights are the dense init's own values (a smaller norm per unit).
    plain_config = esacl_config(sparse_start="magnitude")
    plain = build_config_method(plain_config, benchmark)[1].init(key)
    plain_kernel = np.asarray(plain.params["hidden_1"]["kernel"])
    np.testing.assert_array_equal(plain_kernel, np.where(mask, dense, 0.0))
    assert np.all((plain_kernel**2).sum(0)[alive] < (kernel**2).sum(0)[alive])


def test_mask_update_every_steps_moves_the_mask_inside_a_task(tmp_path):
    """mask_update_every_steps > 0: SDP updates inside the compiled steps, sparsity stays exact."""
    def last(path, **overrides):
        config = esacl_config(prune_fraction=0.02, **overrides)
        config.num_tasks, config.epochs = 1, 1  # no task-start or epoch refresh in this run
        _, _, state = final_state(config, path)
        return state, np.asarray(sdp.find_sdp_state(state.opt_state).masks["hidden_1"]["kernel"])

    state, moved = last(tmp_path / "steps", mask_update_every_steps=10)
    _, still = last(tmp_path / "none", mask_update_every_steps=0)
    _, off = last(tmp_path / "off", mask_update_every_steps=10, sdp=False)
    assert moved.sum() == still.sum() == round(0.1 * moved.size)
    assert np.count_nonzero(moved != still) > 0
    np.testing.assert_array_equal(off, still)  # sdp=False: masks fixed at init, schedule or not
    kernel = np.asarray(state.params["hidden_1"]["kernel"])
    assert np.all(kernel[~moved] == 0.0)


def short_config(**overrides):
    config = esacl_config(**overrides)
    config.num_tasks, config.epochs = 2, 3
    return config


@pytest.fixture(scope="module")
def short_default_run(tmp_path_factory):
    return final_state(short_config(), tmp_path_factory.mktemp("short_default"))


def hidden_mask(state):
    return np.asarray(sdp.find_sdp_state(state.opt_state).masks["hidden_1"]["kernel"])


def flops(run):
    return run[0]["training_flops"]


# Each option with the assertion that tells its run apart from the default's (same seed, same
# data order): a check specific to what the option changes.
VARIANT_CHECKS = {
    "A": (dict(step_variant="A"), lambda run, default: flops(run) > 1.3 * flops(default)),
    "B": (dict(step_variant="B"), lambda run, default: flops(run) > 1.05 * flops(default)),
    "gamma1": (dict(gamma=1.0), lambda run, default: run[1].kept == 10 and default[1].kept == 3),
    "rho0": (dict(rho=0.0),
             lambda run, default: run[1]._no_sam() and not default[1]._no_sam()),
    "clean_loss": (dict(ids_score="clean_loss"), None),
    "random": (dict(ids_score="random"), None),
    "replay_clean": (dict(replay_at="clean"), lambda run, default: run[1]._replay_at_clean()),
    "B_replay_clean": (dict(step_variant="B", replay_at="clean"),
                       lambda run, default: run[1]._replay_at_clean()),
    "rescaled_start": (dict(sparse_start="rescaled"), None),
    "in_task_sdp": (dict(mask_update_every_steps=25),
                    lambda run, default: np.any(hidden_mask(run[2]) != hidden_mask(default[2]))),
    "er": (dict(replay="er"), None),
    "no_buffer": (dict(replay="none"),
                  lambda run, default: run[1].buffer_size == 0 and default[1].buffer_size == 500),
}


@pytest.mark.parametrize("name", list(VARIANT_CHECKS))
def test_every_variant_runs_learns_and_differs(tmp_path, name, short_default_run):
    overrides, check = VARIANT_CHECKS[name]
    run = final_state(short_config(**overrides), tmp_path)
    assert np.diag(np.asarray(run[0]["task_il_matrix"])).min() > 0.7  # chance: 0.5
    # The option changes the computation: the final weights differ from the default run's.
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(run[2].params), jax.tree.leaves(short_default_run[2].params),
                   strict=True))
    if check is not None:
        assert check(run, short_default_run)


def test_step_passes_follow_the_cost_model():
    """B: clean fwd+bwd on B, sharpness forward on B, descent on ceil(gamma B) + 2 replay."""
    config = esacl_config(step_variant="B", rho=0.05, gamma=0.5)
    benchmark = load_config_benchmark(config)
    model = build_model_for(config, benchmark)
    method = build_method(config, model, benchmark)
    b, r = config.batch_size, config.replay_batch_size
    assert method.step_passes() == [Pass("fwd_bwd", b), Pass("fwd", b), Pass("fwd_bwd", b // 2),
                                    Pass("fwd_bwd", r), Pass("fwd_bwd", r)]
    config.esacl.step_variant = "C"
    method_c = build_method(config, model, benchmark)
    assert method_c.step_passes() == [Pass("fwd_bwd", b // 2), Pass("fwd_bwd", b),
                                      Pass("fwd_bwd", r), Pass("fwd_bwd", r)]


def test_bad_esacl_values_are_rejected(tmp_path):
    for overrides, message in [(dict(sparsity=1.0), "sparsity"), (dict(gamma=0.0), "gamma"),
                               (dict(step_variant="Z"), "step_variant"), (dict(rho=-1.0), "rho"),
                               (dict(mask_update_every_steps=-1), "mask_update_every_steps")]:
        with pytest.raises(ValueError, match=message):
            train_and_evaluate(esacl_config(**overrides), tmp_path, progress=False)
        assert not (tmp_path / "results.json").exists()


def test_esacl_on_a_slice_of_split_mnist(tmp_path, shared_data_dir):
    config = split_mnist.get_config("esacl")
    config.data_dir = str(shared_data_dir)
    config.max_train_per_task = 1000
    config.progress = False
    config.tensorboard = False
    result = train_and_evaluate(config, tmp_path, progress=False)
    assert result["metrics"]["class_il"]["average_accuracy"] > 0.5
    assert np.diag(np.asarray(result["task_il_matrix"])).min() > 0.9


def test_esacl_state_is_one_pytree_that_survives_jit(default_run):
    """Masks, counters, score averages, buffer: all arrays inside one train-state pytree."""
    _, _, state = default_run
    leaves = jax.tree.leaves(state)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    again = jax.jit(lambda s: s)(state)
    def raw(x):
        return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    # equal_nan: the IDS table marks never-seen examples with NaN.
    assert jax.tree.all(jax.tree.map(
        lambda a, b: bool(np.array_equal(raw(a), raw(b), equal_nan=raw(a).dtype.kind == "f")),
        state, again))


def test_dense_to_sparse_reaches_the_target_exactly_on_a_cubic_ramp(tmp_path):
    """Start dense, prune along SDP scores every k steps of the first task: exact final sparsity,
    masks only shrink, pruned weights exactly zero, no retraining phase."""
    config = esacl_config(dense_to_sparse=True, prune_every_steps=20, prune_end_fraction=0.5)
    config.num_tasks, config.epochs = 2, 2
    snapshots = []

    def record(task_id, method, state):
        snapshots.append((method, state))

    result = train_and_evaluate(config, tmp_path, progress=False, on_task_end=record)
    method, state = snapshots[0]
    assert method.ramp_steps == int(0.5 * 2 * (DIGITS_TASK0 // config.batch_size))
    assert float(method.target_sparsity(0)) == 0.0
    assert float(method.target_sparsity(method.ramp_steps)) == pytest.approx(0.9)
    half = float(method.target_sparsity(method.ramp_steps // 2))
    assert half == pytest.approx(0.9 * (1 - 0.5**3), abs=0.02)  # cubic: most pruning early
    for _, state in snapshots:
        sdp_masks = sdp.find_sdp_state(state.opt_state).masks
        for name in ("stem", "hidden_1"):  # whole network except the classifier
            mask = np.asarray(sdp_masks[name]["kernel"])
            assert mask.size - mask.sum() == round(0.9 * mask.size)
            assert np.all(np.asarray(state.params[name]["kernel"])[~mask] == 0.0)
        assert np.ndim(sdp_masks["classifier"]["kernel"]) == 0  # not prunable
    assert np.diag(np.asarray(result["task_il_matrix"])).min() > 0.7


def test_a_schedule_that_never_fires_is_a_warning(caplog):
    config = esacl_config(mask_update_every_epochs=5)  # split_digits: 5 epochs, epochs 0-4
    benchmark = load_config_benchmark(config)
    with caplog.at_level("WARNING"):
        build_config_method(config, benchmark)
    assert "never fires" in caplog.text
    caplog.clear()
    config.esacl.mask_update_every_epochs = 2
    with caplog.at_level("WARNING"):
        build_config_method(config, benchmark)
    assert "never fires" not in caplog.text
