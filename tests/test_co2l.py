"""CO2L and SparCL-CO2L: the losses against hand computations, IRD off on the first task through
the method's own step, SparCL-CO2L's exact sparsity across steps and a task boundary, and an
end-to-end run on scikit-learn's digits that learns and is accounted for (FLOPs, memory).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax.harness import loop as train
from esacl_jax.harness.data.augment import random_resized_crop
from esacl_jax.harness.methods import METHODS, config_sections, method_class, section_readers
from esacl_jax.harness.methods.base import Batch, Pass
from esacl_jax.harness.methods.co2l import CO2L, asym_supcon_loss, ird_loss
from experiments.configs import split_digits
from tests.test_baselines import DIGITS_PER_TASK, digits_config

# ----------------------------------------------------------------------------- pure pieces

# Two examples, two views, 2-d features already of unit norm. Rows: view 1 of examples 0 and 1,
# then view 2 of examples 0 and 1.
Z = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]])


def test_asym_supcon_by_hand():
    # Example 0 (label 0) is of the current task: its two rows are the anchors; example 1
    # (label 1, replayed) is only contrasted. Similarities: row 0 to rows 1, 2, 3: 0, 0.6, -0.8;
    # row 2 to rows 0, 1, 3: 0.6, 0.8, 0. Each anchor's one positive is its other view.
    t, base = 0.5, 0.07
    row0 = 0.6 / t - math.log(math.exp(0.0) + math.exp(0.6 / t) + math.exp(-0.8 / t))
    row2 = 0.6 / t - math.log(math.exp(0.6 / t) + math.exp(0.8 / t) + math.exp(0.0))
    expected = -(t / base) * (row0 + row2) / 4  # mean over all 4 rows; non-anchors count 0
    labels, valid = jnp.array([0, 1]), jnp.array([True, True])
    got = asym_supcon_loss(Z, labels, jnp.array([True, False]), valid, t, base)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Asymmetric: with both examples anchors the loss is larger by example 1's rows.
    both = asym_supcon_loss(Z, labels, jnp.array([True, True]), valid, t, base)
    assert float(both) > float(got) + 0.1
    # An invalid (padding) third example is neither contrasted nor an anchor.
    z3 = jnp.concatenate([Z[:2], jnp.array([[0.0, -1.0]]), Z[2:], jnp.array([[1.0, 0.0]])])
    padded = asym_supcon_loss(z3, jnp.array([0, 1, 0]), jnp.array([True, False, True]),
                              jnp.array([True, True, False]), t, base)
    assert float(padded) == pytest.approx(expected, rel=1e-5)


def test_ird_by_hand():
    # Past features: rows 0 and 2 equal, rows 1 and 3 equal, orthogonal pairs; at past_temp 1
    # each row's distribution over the 3 other rows is (1, e, 1) / (e + 2), e at its twin. The
    # current features are the same at current_temp 0.5: (1, e^2, 1) / (e^2 + 2). Every row's
    # cross-entropy is then -(2 log(1 / (e^2 + 2)) + e log(e^2 / (e^2 + 2))) / (e + 2)
    # = log(e^2 + 2) - 2e / (e + 2).
    z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    e = math.e
    expected = math.log(e**2 + 2) - 2 * e / (e + 2)
    got = ird_loss(z, z, jnp.array([True, True]), current_temp=0.5, past_temp=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # No gradient reaches the past features; the current ones get one.
    g_cur, g_past = jax.grad(lambda a, b: ird_loss(a, b, jnp.array([True, True]), 0.5, 1.0),
                             argnums=(0, 1))(Z, z)
    assert np.all(np.asarray(g_past) == 0) and np.abs(np.asarray(g_cur)).sum() > 0


def test_resized_crop_of_the_whole_image_is_the_identity():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)), jnp.uint8)
    out = random_resized_crop(jax.random.key(0), x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x, np.float32), atol=1e-3)


def test_registry_rows_and_config_sections():
    for name in ("co2l", "sparcl_co2l"):
        assert name in METHODS and method_class(name).name == name
    assert config_sections("sparcl_co2l") == ("sparcl", "co2l")
    assert section_readers()["co2l"] == {"co2l", "sparcl_co2l"}
    config = split_digits.get_config("sparcl_co2l")
    assert config.co2l.temperature == 0.1 and config.co2l.crop_scale_min == 0.7


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def digits_method():
    config = digits_config("co2l", **{"co2l.distill_power": 5.0})
    benchmark, method = train.build_config_method(config)
    return benchmark, method


def test_ird_is_zero_on_the_first_task_through_the_step(digits_method):
    benchmark, method = digits_method
    state = method.init(jax.random.key(0))
    # A past model unlike the current one: IRD would be far from 0 if it were applied.
    past = jax.tree.map(lambda w: w + 0.5 * jax.random.normal(jax.random.key(3), w.shape),
                        state.method_state.past_params)
    state = state.replace(method_state=state.method_state._replace(past_params=past))
    x, y, _ = train.task_arrays(benchmark, 0)
    idx = jnp.arange(10)
    batch = Batch(x=x[idx].astype(jnp.float32), x_raw=x[idx], y=y[idx], index=idx)
    step = jax.jit(method.train_step)
    terms = jax.jit(method.loss_and_grads)
    key = jax.random.key(7)
    loss_key = jax.random.split(key)[0]  # the step's own split
    for task_id in (0, 1):
        ctx = train.task_context(benchmark, task_id)
        _, metrics = step(state, batch, ctx, key)
        loss, _, aux = terms(state, batch, ctx, loss_key)
        assert float(metrics.loss) == pytest.approx(float(loss), rel=1e-6)
        if task_id == 0:
            assert float(aux.ird) == 0.0
            assert float(metrics.loss) == pytest.approx(float(aux.supcon), rel=1e-6)
        else:
            assert float(aux.ird) > 0.1
            assert float(metrics.loss) == pytest.approx(float(aux.supcon) + 5.0 * float(aux.ird),
                                                        rel=1e-5)
    assert method.step_passes_for_task(0) == [Pass("fwd_bwd", 40, method.trained_modules)]
    assert method.step_passes_for_task(1)[1] == Pass("fwd", 40, method.trained_modules)


# ----------------------------------------------------------------------------- SparCL-CO2L


def host(state):
    return jax.device_get({"params": state.params, "method_state": state.method_state})


def sparse_layers(masks):
    return {jax.tree_util.keystr(p): np.asarray(m)
            for p, m in jax.tree_util.tree_flatten_with_path(masks)[0] if np.ndim(m) > 0}


def test_sparcl_co2l_holds_exact_sparsity_across_steps_and_a_task_boundary(tmp_path):
    # 2 epochs: TDM prunes and regrows at epochs 0 and 1; DDR drops 30% at epoch 1 (by the
    # forgetting events of the nearest-class-mean correctness).
    config = digits_config("sparcl_co2l", num_tasks=2, epochs=2,
                           **{"sparcl.tdm_every": 1, "sparcl.sparsity": 0.8,
                              "co2l.linear_epochs": 5})
    records = []
    cls = method_class("sparcl_co2l")

    class Probe(cls):
        def epoch_indices(self, state, task_id, epoch, num_examples):
            idx = super().epoch_indices(state, task_id, epoch, num_examples)
            records.append(("indices", task_id, epoch, num_examples if idx is None else len(idx)))
            return idx

        def begin_epoch(self, state, task_id, epoch):
            state = super().begin_epoch(state, task_id, epoch)
            records.append(("epoch", task_id, epoch, host(state)))
            return state

        def end_task(self, state, task_id, x, y):
            records.append(("before_end", task_id, None, host(state)))
            state = super().end_task(state, task_id, x, y)
            records.append(("end", task_id, None, host(state)))
            return state

    result = train.train_and_evaluate(config, tmp_path, progress=False, make_method=Probe)
    s = config.sparcl.sparsity
    states = [r for r in records if r[0] != "indices"]
    assert len(states) == 8  # 2 tasks x (2 epochs + before/after the task end)
    for kind, task, epoch, st in states:
        layers = sparse_layers(st["method_state"].masks)
        # The encoder's kernels and the projection head's; never the (linear) classifier.
        assert sorted(layers) == ["['hidden_1']['kernel']",
                                  "['projection_head']['hidden']['kernel']",
                                  "['projection_head']['out']['kernel']", "['stem']['kernel']"]
        for path, m in layers.items():
            assert m.sum() == m.size - round(s * m.size), (kind, task, epoch, path)
        for w, m in zip(jax.tree.leaves(st["params"]),
                        jax.tree.leaves(st["method_state"].masks), strict=True):
            if np.ndim(m):
                assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0), (kind, task, epoch)
    # The masks moved (TDM) and the past model of task 1 is the sparse model task 0 ended with.
    first, second = (sparse_layers(states[i][3]["method_state"].masks) for i in (0, 1))
    assert any(np.any(first[k] != second[k]) for k in first)
    end0 = next(st for kind, task, _, st in states if kind == "end" and task == 0)
    task1 = next(st for kind, task, epoch, st in states if kind == "epoch" and task == 1)
    for name, tree in task1["method_state"].past_params.items():
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(end0["params"][name]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    # DDR ran on the NCM correctness: 30% of each task's examples dropped at epoch 1.
    sizes = [(t, e, n) for kind, t, e, n in records if kind == "indices"]
    kept = DIGITS_PER_TASK - round(0.3 * DIGITS_PER_TASK)
    assert sizes == [(0, 0, DIGITS_PER_TASK), (0, 1, kept), (1, 0, DIGITS_PER_TASK), (1, 1, kept)]
    assert result["per_task"][-1]["sparsity"]["prunable_sparsity"] == pytest.approx(s)
    # The exported (evaluated) model has no head; its prunable kernels are sparse.
    assert result["sparse_export"]["file"] == "sparse_model.npz"
    assert result["weights"]["total"] == 64 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


# ----------------------------------------------------------------------------- end to end


def test_co2l_learns_on_digits_and_is_accounted_for(tmp_path):
    config = digits_config("co2l")
    result = train.train_and_evaluate(config, tmp_path, progress=False)
    class_il = result["metrics"]["class_il"]["average_accuracy"]
    assert class_il > 0.6, class_il  # chance after 5 tasks: 0.1
    assert result["metrics"]["task_il"]["average_accuracy"] > 0.9
    # FLOPs by hand: MLP 64-100-100-10 with a 100-100-128 head, per example 2 x multiply-adds:
    # stem 12800, hidden_1 20000, classifier 2000, head 20000 + 25600.
    trained, encoder, classifier = 12800 + 20000 + 20000 + 25600, 12800 + 20000, 2000
    steps = (DIGITS_PER_TASK // 10) * config.epochs
    rows = 2 * (10 + 10)  # two views of batch 10 + replay 10
    expected = 0.0
    for task, entry in enumerate(result["per_task"]):
        passes_per_row = 3 + (1 if task > 0 else 0)  # fwd+bwd, and the past model's forward
        expected += steps * rows * passes_per_row * trained
        n = entry["linear_classifier_examples"]  # the task's data + the buffer's earlier tasks
        assert n == DIGITS_PER_TASK if task == 0 else DIGITS_PER_TASK < n <= DIGITS_PER_TASK + 500
        expected += n * encoder + 100 * n * 3 * classifier  # features once; 100 epochs
    assert result["training_flops"] == pytest.approx(expected, rel=1e-9)
    # Memory: the past model (encoder + head, float32) beside the params.
    past = (64 * 100 + 100) + (100 * 100 + 100) + (100 * 100 + 100) + (100 * 128 + 128)
    assert result["memory"]["analytic"]["method_state"] == 4 * past
    assert result["memory"]["analytic"]["dense_params"] == 4 * (past + 100 * 10 + 10)


def test_co2l_validates_its_config():
    assert CO2L.scenarios == ("class_il", "domain_il")
    config = digits_config("co2l", **{"co2l.temperature": 0.0})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        train.build_config_method(config)


def test_method_md_co2l_table_is_the_configs():
    from esacl_jax.harness.config import base_config, get_config
    from tests.test_docs import METHOD, _code, _field, _section, _table_rows, _value

    header = "| field | default | MNIST-family rows | from |"
    section = _section(METHOD.read_text(encoding="utf-8"), "CO2L")
    rows = _table_rows(header + section.split(header, 1)[1].split("\n\n", 1)[0])
    base, mnist = base_config(), get_config("split_mnist_w400", "co2l")
    fields, wrong = set(), []
    for row in rows:
        (field,), (default,), (protocol,) = _code(row[0]), _code(row[1]), _code(row[2])
        fields.add(field)
        if _field(base, field) != _value(default):
            wrong.append(f"{field}: METHOD.md default {default}, base_config {_field(base, field)}")
        if _field(mnist, field) != _value(protocol):
            wrong.append(f"{field}: METHOD.md row {protocol}, protocol {_field(mnist, field)}")
    assert wrong == []
    assert {f"co2l.{k}" for k in base.co2l} <= fields  # every knob is in the table
    # Every MNIST-family protocol (and the CNN one) gets the row the table quotes.
    for protocol in ("split_digits", "split_fashion_mnist_w400", "split_fashion_mnist_cnn_e5",
                     "permuted_mnist"):
        assert get_config(protocol, "co2l").co2l == mnist.co2l
