"""Tests of esacl_jax.masks: prunable filter, sparsity levels, exact-count masks, prune/regrow."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from esacl_jax import masks

# ----------------------------------------------------------------------------- fixtures


def resnet18_shapes() -> dict:
    """A linen-style parameter tree with the names and shapes of the CIFAR ResNet-18."""
    params = {"stem": {"kernel": (3, 3, 3, 64)}, "stem_bn": {"scale": (64,), "bias": (64,)}}
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            name = f"stage{stage}_block{block}"
            layer = {
                "conv1": {"kernel": (3, 3, cin, cout)},
                "bn1": {"scale": (cout,), "bias": (cout,)},
                "conv2": {"kernel": (3, 3, cout, cout)},
                "bn2": {"scale": (cout,), "bias": (cout,)},
            }
            if block == 0 and cin != cout:
                layer["shortcut"] = {"kernel": (1, 1, cin, cout)}
                layer["shortcut_bn"] = {"scale": (cout,), "bias": (cout,)}
            params[name] = layer
            cin = cout
    params["classifier"] = {"kernel": (512, 10), "bias": (10,)}
    return {"params": params}


def as_structs(shapes: dict) -> dict:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def random_params(shapes: dict, seed: int = 0) -> dict:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, s) for k, s in zip(keys, leaves, strict=True)])


MLP_SHAPES = {
    "stem": {"kernel": (784, 100), "bias": (100,)},
    "hidden": {"kernel": (100, 100), "bias": (100,)},
    "classifier": {"kernel": (100, 10), "bias": (10,)},
}

SMALL_SHAPES = {
    "stem": {"kernel": (5, 8), "bias": (8,)},
    "block": [{"kernel": (8, 12)}, {"kernel": (3, 3, 12, 6)}],
    "hidden": {"kernel": (6, 9), "bias": (9,)},
    "classifier": {"kernel": (9, 3), "bias": (3,)},
}


# ----------------------------------------------------------------------------- paths, filters


def test_path_names_all_key_kinds():
    path = (DictKey("params"), GetAttrKey("layers"), SequenceKey(2), DictKey("kernel"))
    assert masks.path_names(path) == ("params", "layers", "2", "kernel")
    # The trailing `.value` of an nnx Variable is dropped.
    assert masks.path_names((DictKey("hidden"), DictKey("kernel"), GetAttrKey("value"))) == (
        "hidden",
        "kernel",
    )
    assert masks.path_string((DictKey("a"), SequenceKey(0), DictKey("kernel"))) == "a/0/kernel"


def test_default_prunable_resnet18_is_every_kernel_but_the_classifier():
    """The default set (library and harness): every kernel but the logits layer, stem and 1x1
    shortcuts included; SparCL's name-based set is exactly the 16 block convolutions."""
    flags = masks.prunable_tree(as_structs(resnet18_shapes()))
    flat = jax.tree_util.tree_flatten_with_path(flags)[0]
    chosen = [masks.path_string(p) for p, f in flat if f]
    assert len(chosen) == 16 + 1 + 3 and not any("classifier" in c for c in chosen)
    assert all(isinstance(f, bool) for _, f in flat)
    named = masks.prunable_tree(as_structs(resnet18_shapes()), "by_layer_name")
    chosen = [masks.path_string(p) for p, f in jax.tree_util.tree_flatten_with_path(named)[0] if f]
    assert len(chosen) == 16
    assert all(("conv1" in c or "conv2" in c) and "shortcut" not in c for c in chosen)


def test_default_prunable_mlp_and_the_sparcl_option():
    flags = masks.prunable_tree(as_structs(MLP_SHAPES))
    chosen = [masks.path_string(p) for p, f in jax.tree_util.tree_flatten_with_path(flags)[0] if f]
    assert chosen == ["hidden/kernel", "stem/kernel"]
    for sparcl in ("all_but_input_and_output", "by_layer_name"):  # the first layer dense too
        flags = masks.prunable_tree(as_structs(MLP_SHAPES), sparcl)
        flat = jax.tree_util.tree_flatten_with_path(flags)[0]
        assert [masks.path_string(p) for p, f in flat if f] == ["hidden/kernel"]
    with pytest.raises(ValueError, match="prunable must be one of"):
        masks.prunable_tree(as_structs(MLP_SHAPES), "everything")


def _nnx_param_state():
    """The nnx.Param state of a stem / one-block / classifier network of nnx.Linear layers."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.stem = nnx.Linear(4, 8, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs)])
            self.classifier = nnx.Linear(8, 2, rngs=rngs)

    return nnx.state(Net(nnx.Rngs(0)), nnx.Param)


def test_default_prunable_with_nnx_state():
    from flax import nnx

    state = _nnx_param_state()
    for tree in (state, nnx.as_pure(state)):
        flat = jax.tree_util.tree_flatten_with_path(masks.prunable_tree(tree))[0]
        assert [masks.path_string(p) for p, f in flat if f] == ["blocks/0/kernel", "stem/kernel"]


# ----------------------------------------------------------------------------- sparsity levels


def reference_erk(shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
    """RigL's get_sparsities_erdos_renyi (erk_power_scale=1), transcribed."""
    dense: set[int] = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            if i in dense:
                rhs -= n * sparsity
            else:
                rhs += n * (1 - sparsity)
                raw[i] = sum(shape) / n
                divisor += raw[i] * n
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense |= {i for i, p in raw.items() if p == max_prob}
        else:
            break
    return [0.0 if i in dense else 1.0 - eps * raw[i] for i in range(len(shapes))]


def test_uniform_sparsities():
    sp = masks.layer_sparsities(as_structs(SMALL_SHAPES), 0.75)
    flat = jax.tree_util.tree_flatten_with_path(sp)[0]
    values = {masks.path_string(p): v for p, v in flat}
    assert values["block/0/kernel"] == 0.75 and values["hidden/kernel"] == 0.75
    assert values["stem/kernel"] == 0.75  # the default set: every kernel but the logits layer
    assert values["classifier/kernel"] == 0.0 and values["classifier/bias"] == 0.0
    sparcl = masks.layer_sparsities(as_structs(SMALL_SHAPES), 0.75,
                                    prunable="all_but_input_and_output")
    assert sparcl["stem"]["kernel"] == 0.0 and sparcl["hidden"]["kernel"] == 0.75
    assert all(isinstance(v, float) for _, v in flat)


def test_erk_matches_rigl_and_meets_global_target():
    params = as_structs(resnet18_shapes())
    flags = jax.tree.leaves(masks.prunable_tree(params, "by_layer_name"))  # the 16 block convs
    shapes = [s.shape for s, f in zip(jax.tree.leaves(params), flags, strict=True) if f]
    for target in (0.5, 0.9, 0.95):
        got = [
            v
            for v, f in zip(
                jax.tree.leaves(masks.layer_sparsities(params, target, "erk", "by_layer_name")),
                flags, strict=True)
            if f
        ]
        np.testing.assert_allclose(got, reference_erk(shapes, target), atol=1e-9)
        sizes = np.array([math.prod(s) for s in shapes])
        global_sparsity = float(np.sum(np.asarray(got) * sizes) / sizes.sum())
        assert abs(global_sparsity - target) < 1e-9
        # Larger layers are sparser under ERK.
        assert got[-1] > got[0]


def test_erk_sets_small_layers_dense():
    params = as_structs({"a": {"kernel": (2, 2)}, "b": {"kernel": (200, 300)}})
    sp = masks.layer_sparsities(params, 0.9, "erk", prunable="by_layer_name")
    assert sp["a"]["kernel"] == 0.0
    # The dense layer's weights are taken out of the big layer's budget: global target exact.
    total = 4 + 200 * 300
    assert abs(sp["b"]["kernel"] * 60000 - 0.9 * total) < 1e-6


def test_erk_traced_matches_static():
    params = as_structs(resnet18_shapes())
    static = jax.tree.leaves(masks.layer_sparsities(params, 0.8, "erk"))
    traced = jax.jit(lambda s: masks.layer_sparsities(params, s, "erk"))(0.8)
    np.testing.assert_allclose(jax.tree.leaves(traced), static, atol=1e-5)


def test_bad_distribution_raises():
    with pytest.raises(ValueError, match="distribution"):
        masks.layer_sparsities(as_structs(SMALL_SHAPES), 0.5, "gaussian")


# ----------------------------------------------------------------------------- top_mask


def test_top_mask_exact_count_and_order():
    scores = jax.random.normal(jax.random.key(0), (7, 9))
    keep = jax.jit(masks.top_mask)
    order = np.argsort(-np.asarray(scores).reshape(-1), kind="stable")
    for k in (0, 1, 17, 63):
        got = np.asarray(keep(scores, k)).reshape(-1)
        want = np.zeros(63, bool)
        want[order[:k]] = True
        np.testing.assert_array_equal(got, want)


def test_top_mask_ties_by_index_and_nan_last():
    scores = jnp.array([1.0, 2.0, 2.0, jnp.nan, 2.0, 0.0])
    np.testing.assert_array_equal(
        masks.top_mask(scores, 2), [False, True, True, False, False, False]
    )
    np.testing.assert_array_equal(masks.top_mask(scores, 5), [True, True, True, False, True, True])
    assert int(masks.top_mask(scores, 99).sum()) == 6


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_magnitude_masks_exact_counts(distribution):
    params = random_params(SMALL_SHAPES)
    sp = masks.layer_sparsities(params, 0.7, distribution)
    m = jax.jit(lambda p: masks.magnitude_masks(p, sp))(params)
    flags = jax.tree.leaves(masks.prunable_tree(params))
    for w, mask, s, f in zip(
        jax.tree.leaves(params), jax.tree.leaves(m), jax.tree.leaves(sp), flags, strict=True
    ):
        if not f:
            assert mask.shape == () and bool(mask) and mask.dtype == jnp.bool_
            continue
        assert mask.shape == w.shape and mask.dtype == jnp.bool_
        assert int((~mask).sum()) == round(s * w.size)
        # The kept weights are the largest in magnitude.
        w, mask = np.abs(np.asarray(w)), np.asarray(mask)
        if 0 < mask.sum() < mask.size:
            assert w[mask].min() >= w[~mask].max()


def test_magnitude_masks_traced_sparsity():
    params = random_params(SMALL_SHAPES)

    def build(s):
        return masks.magnitude_masks(params, masks.layer_sparsities(params, s))

    traced = jax.jit(build)(0.6)
    jax.tree.map(np.testing.assert_array_equal, traced, build(0.6))


def test_apply_masks_dtype_and_exact_zero():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(SMALL_SHAPES))
    m = masks.magnitude_masks(params, masks.layer_sparsities(params, 0.5))
    out = masks.apply_masks(params, m)
    for w, o, mask in zip(
        jax.tree.leaves(params), jax.tree.leaves(out), jax.tree.leaves(m), strict=True
    ):
        assert o.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(o, np.float32), np.where(mask, np.asarray(w, np.float32), 0.0)
        )


def test_sparse_init_keeps_each_units_dense_norm():
    params = random_params(SMALL_SHAPES, seed=3)
    m = masks.magnitude_masks(params, masks.layer_sparsities(params, 0.75))
    plain = masks.sparse_init(params, m, rescale=False)
    jax.tree.map(np.testing.assert_array_equal, plain, masks.apply_masks(params, m))
    out = masks.sparse_init(params, m, rescale=True)
    for (path, w), o, mask in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(out), jax.tree.leaves(m),
        strict=True,
    ):
        w, o = np.asarray(w), np.asarray(o)
        if np.ndim(mask) == 0:  # non-prunable: untouched
            np.testing.assert_array_equal(o, w, err_msg=masks.path_string(path))
            continue
        assert np.all(o[~np.asarray(mask)] == 0.0)  # pruned stay exactly zero
        axes = tuple(range(w.ndim - 1))
        alive = np.asarray(mask).any(axes)  # a unit whose weights were all pruned stays zero
        np.testing.assert_allclose((o**2).sum(axes)[alive], (w**2).sum(axes)[alive], rtol=1e-5)
        assert np.all((o**2).sum(axes)[~alive] == 0.0)
        # a per-unit positive scale of the kept weights, > 1 because something was pruned
        ratio = np.where(mask, o / np.where(w == 0, 1.0, w), np.nan)
        per_unit = ratio.reshape(-1, w.shape[-1])[:, alive]
        assert np.all(np.nanmax(per_unit, 0) - np.nanmin(per_unit, 0) < 1e-5)
        assert np.all(np.nanmin(per_unit, 0) > 1.0)


def test_sparse_init_dtype_and_empty_unit():
    w = jnp.array([[1.0, 0.0], [2.0, 0.0]], jnp.bfloat16)
    m = jnp.array([[False, True], [True, True]])
    out = masks.sparse_init({"hidden": {"kernel": w}}, {"hidden": {"kernel": m}}, rescale=True)
    out = out["hidden"]["kernel"]
    assert out.dtype == jnp.bfloat16
    # unit 0 keeps 2.0 of norm^2 5 -> sqrt(5); unit 1 is all zeros and stays 0 (no NaN)
    np.testing.assert_allclose(np.asarray(out, np.float32), [[0.0, 0.0], [np.sqrt(5.0), 0.0]],
                               rtol=1e-2)


# ----------------------------------------------------------------------------- scores, regrowth


def test_sdp_scores():
    w = {"k": jnp.array([[1.0, -2.0], [0.5, 0.0]])}
    g = {"k": jnp.array([[-0.5, 1.0], [2.0, 3.0]])}
    h = {"k": jnp.array([[1.0, 2.0], [4.0, 0.0]])}
    mg = masks.sdp_scores(w, g, score_lambda=0.5, normalize=False)["k"]
    np.testing.assert_allclose(mg, [[1.25, 2.5], [1.5, 1.5]])
    ty = masks.sdp_scores(w, g, kind="taylor", curvature=h, normalize=False)["k"]
    np.testing.assert_allclose(ty, [[0.5 + 0.5, 2.0 + 4.0], [1.0 + 0.5, 0.0]])
    # Normalised (default): G brought to the layer's weight scale, c = mean|w| / mean|G|.
    c = 0.875 / 1.625
    mg = masks.sdp_scores(w, g, score_lambda=0.5)["k"]
    np.testing.assert_allclose(mg, np.abs(w["k"]) + 0.5 * np.abs(g["k"]) * c, rtol=1e-6)
    ty = masks.sdp_scores(w, g, kind="taylor", curvature=h)["k"]
    c = 1 / 1.625
    want = np.abs(w["k"] * g["k"]) * c + 0.5 * h["k"] * np.square(w["k"]) * c**2
    np.testing.assert_allclose(ty, want, rtol=1e-6)
    with pytest.raises(ValueError):
        masks.sdp_scores(w, g, kind="taylor")


def _check_prune_and_regrow(old, new, grown, scores, regrow_scores, n_expected, by_gradient):
    old, new, grown = (np.asarray(x).reshape(-1) for x in (old, new, grown))
    scores, regrow_scores = (np.asarray(x).reshape(-1) for x in (scores, regrow_scores))
    assert new.sum() == old.sum()
    pruned = old & ~new
    assert pruned.sum() == n_expected and grown.sum() == n_expected
    np.testing.assert_array_equal(grown, new & ~old)
    if n_expected:
        # Pruned: the lowest-scoring active weights.
        assert scores[pruned].max() <= scores[old & new].min()
        if by_gradient:
            # Regrown: the largest |G| among previously inactive weights.
            assert np.abs(regrow_scores[grown]).min() >= np.abs(regrow_scores[~old & ~new]).max()


@pytest.mark.parametrize("regrow", ["gradient", "random"])
def test_prune_and_regrow_keeps_counts(regrow):
    params = random_params(SMALL_SHAPES)
    m = masks.magnitude_masks(params, masks.layer_sparsities(params, 0.5))
    grad = random_params(SMALL_SHAPES, seed=1)
    scores = masks.sdp_scores(params, grad)
    fn = jax.jit(
        lambda m, s, g, key: masks.prune_and_regrow(m, s, g, fraction=0.1, key=key, regrow=regrow)
    )
    new, grown = fn(m, scores, grad, jax.random.key(3))
    for o, n, gr, s, g in zip(
        *(jax.tree.leaves(t) for t in (m, new, grown, scores, grad)), strict=True
    ):
        if o.ndim == 0:
            assert n.shape == () and bool(n) and not bool(gr)
            continue
        n_expected = min(round(0.1 * o.size), int(o.sum()), int((~o).sum()))
        _check_prune_and_regrow(o, n, gr, s, g, n_expected, regrow == "gradient")


def test_prune_and_regrow_caps_and_traced_fraction():
    m = {"kernel": jnp.array([[True, True, True, False]])}
    s = {"kernel": jnp.array([[3.0, 1.0, 2.0, 0.0]])}
    g = {"kernel": jnp.array([[0.0, 0.0, 0.0, 5.0]])}
    fn = jax.jit(lambda f: masks.prune_and_regrow(m, s, g, fraction=f, key=jax.random.key(0)))
    # fraction 0.5 of 4 = 2, capped at 1 inactive weight: prune index 1, regrow index 3.
    new, grown = fn(0.5)
    np.testing.assert_array_equal(new["kernel"], [[True, False, True, True]])
    np.testing.assert_array_equal(grown["kernel"], [[False, False, False, True]])
    new, _ = fn(0.0)
    np.testing.assert_array_equal(new["kernel"], m["kernel"])
    # A fully dense layer cannot change.
    dense = {"kernel": jnp.ones((1, 4), bool)}
    same, _ = masks.prune_and_regrow(dense, s, g, fraction=0.5, key=jax.random.key(0))
    np.testing.assert_array_equal(same["kernel"], dense["kernel"])


def test_sparsity_summary():
    params = random_params(SMALL_SHAPES)
    m = masks.magnitude_masks(params, masks.layer_sparsities(params, 0.5))
    summary = masks.sparsity_summary(m)
    assert set(summary["layers"]) == {"stem/kernel", "block/0/kernel", "block/1/kernel",
                                      "hidden/kernel"}
    sizes = {"stem/kernel": 40, "block/0/kernel": 96, "block/1/kernel": 648, "hidden/kernel": 54}
    for name, size in sizes.items():
        layer = summary["layers"][name]
        assert layer["size"] == size and layer["active"] == size - round(0.5 * size)
        assert layer["sparsity"] == pytest.approx(round(0.5 * size) / size)
    assert summary["num_prunable"] == sum(sizes.values())
    assert summary["global_sparsity"] == pytest.approx(
        1 - summary["num_active"] / summary["num_prunable"]
    )
    assert "sparsity_all_weights" not in summary  # needs the params' sizes
    # Over all weights (hand count): 838 prunable of 838 + 8 + 9 + 27 + 3 = 885 weights, of which
    # round(0.5 * size) per layer (20 + 48 + 324 + 27 = 419) are pruned.
    full = masks.sparsity_summary(m, params=params)
    assert full["num_weights"] == 885 and full["num_pruned"] == 419
    assert full["sparsity_all_weights"] == pytest.approx(419 / 885)
    assert full["prunable_fraction"] == pytest.approx(838 / 885)


def test_a_prunable_set_that_leaves_most_weights_dense_warns_once(caplog):
    """784-100-100-10 with SparCL's set (the hidden layer only): 10,000 of 89,610 weights are
    prunable, so 0.9 over the set is 0.100 over all weights: one warning line says so."""
    import optax

    from esacl_jax import keep_sparse, sdp_transform

    params = random_params(MLP_SHAPES)
    with caplog.at_level("WARNING", logger="esacl_jax"):
        keep_sparse(optax.chain(sdp_transform(0.9, prunable="all_but_input_and_output"),
                                optax.sgd(0.1))).init(params)
    records = [r for r in caplog.records if r.name == "esacl_jax"]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert "11.2% of all weights" in records[0].getMessage()
    assert "0.100 over all weights" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="esacl_jax"):  # the default set: 98.8% prunable
        keep_sparse(optax.chain(sdp_transform(0.9), optax.sgd(0.1))).init(params)
    assert not [r for r in caplog.records if r.name == "esacl_jax"]


@pytest.mark.parametrize("kind", ["magnitude_gradient", "taylor"])
def test_sdp_scores_ranking_ignores_the_loss_scale(kind):
    """A loss x3 (reduction, batch size, loss weight) scales G by 3 and h by 9: the normalised
    scores are unchanged; the raw ones change the ranking."""
    params = random_params(SMALL_SHAPES)
    grad = jax.tree.map(lambda x: 0.01 * x, random_params(SMALL_SHAPES, seed=1))
    curv = jax.tree.map(lambda x: 1e-4 * jnp.abs(x), random_params(SMALL_SHAPES, seed=2))

    def scores(scale, normalize):
        return masks.sdp_scores(params, jax.tree.map(lambda g: scale * g, grad), kind=kind,
                                curvature=jax.tree.map(lambda h: scale**2 * h, curv),
                                normalize=normalize)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6),
                 scores(1.0, True), scores(3.0, True))
    raw1, raw3 = scores(1.0, False), scores(300.0, False)
    orders = [np.argsort(np.asarray(t["hidden"]["kernel"]).ravel()) for t in (raw1, raw3)]
    assert not np.array_equal(*orders)


# ----------------------------------------------------------------------------- structural


def _chosen(flags) -> list[str]:
    return [masks.path_string(p) for p, f in jax.tree_util.tree_flatten_with_path(flags)[0] if f]


def test_structural_prunable_flax_auto_names():
    """Dense_0..Dense_3 (and Dense_10 after Dense_2): the logits layer is kept (and the first
    with dense_first)."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (32, 32, 32):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    params = MLP().init(jax.random.key(0), jnp.ones((1, 20)))["params"]
    assert _chosen(masks.structural_prunable(params)) == [
        "Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    assert _chosen(masks.structural_prunable(params, dense_first=True)) == [
        "Dense_1/kernel", "Dense_2/kernel"]
    # The name filter prunes the first layer and the classifier of the same model.
    assert _chosen(masks.prunable_tree(params, masks.name_prunable)) == [
        "Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel", "Dense_3/kernel"]
    many = {f"Dense_{i}": {"kernel": jnp.ones((8, 8) if 0 < i < 11 else (4, 8) if i == 0
                                              else (8, 3))} for i in range(12)}
    chosen = _chosen(masks.structural_prunable(many, dense_first=True))
    assert sorted(chosen) == sorted(f"Dense_{i}/kernel" for i in range(1, 11))
    assert sorted(_chosen(masks.structural_prunable(many))) == sorted(
        f"Dense_{i}/kernel" for i in range(0, 11))
    # Same widths everywhere: shapes cannot tell, the natural order does (Dense_11 is last).
    square = {f"Dense_{i}": {"kernel": jnp.ones((8, 8))} for i in range(12)}
    chosen = _chosen(masks.structural_prunable(square, dense_first=True))
    assert sorted(chosen) == sorted(f"Dense_{i}/kernel" for i in range(1, 11))


def test_structural_prunable_cnn_resnet_and_attention():
    cnn = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 8))},
           "Conv_1": {"kernel": jnp.ones((3, 3, 8, 16))},
           "Dense_0": {"kernel": jnp.ones((784, 32))}, "Dense_1": {"kernel": jnp.ones((32, 10))}}
    assert _chosen(masks.structural_prunable(cnn, dense_first=True)) == [
        "Conv_1/kernel", "Dense_0/kernel"]
    assert _chosen(masks.structural_prunable(cnn)) == [
        "Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
    resnet = masks.structural_prunable(as_structs(resnet18_shapes()), dense_first=True)
    chosen = _chosen(resnet)
    assert len(chosen) == 16 + 3  # block convs and the 1x1 shortcuts; stem and classifier kept
    assert not any("stem" in c or "classifier" in c for c in chosen)
    # A transformer block: attention kernels (DenseGeneral 3-D) are pruned, whatever their name
    # ("head"); the embedding and the output projection to the vocabulary are kept.
    d, h, v = 16, 4, 50
    lm = {"embed": {"embedding": jnp.ones((v, d))},
          "block_0": {"attention_head": {"query": {"kernel": jnp.ones((d, h, d // h))},
                                         "key": {"kernel": jnp.ones((d, h, d // h))},
                                         "value": {"kernel": jnp.ones((d, h, d // h))},
                                         "out": {"kernel": jnp.ones((h, d // h, d))}},
                      "mlp": {"up": {"kernel": jnp.ones((d, 4 * d))},
                              "down": {"kernel": jnp.ones((4 * d, d))}}},
          "lm_head": {"kernel": jnp.ones((d, v + 1))}}
    chosen = _chosen(masks.structural_prunable(lm, dense_first=True))
    assert "embed/embedding" not in chosen and "lm_head/kernel" not in chosen
    assert len(chosen) == 6 and any("query" in c for c in chosen)
    assert sorted(_chosen(masks.structural_prunable(lm))) == sorted(["embed/embedding", *chosen])


def test_structural_prunable_nothing_and_nnx():
    assert _chosen(masks.structural_prunable({"kernel": jnp.ones((3, 3))})) == []
    assert _chosen(masks.structural_prunable({"bias": jnp.ones((3,))})) == []
    from flax import nnx

    state = _nnx_param_state()
    for tree in (state, nnx.as_pure(state)):
        assert _chosen(masks.structural_prunable(tree)) == ["blocks/0/kernel", "stem/kernel"]
        assert _chosen(masks.structural_prunable(tree, dense_first=True)) == ["blocks/0/kernel"]


# ----------------------------------------------------------------------------- random regrowth


def test_random_regrowth_is_uniform_over_the_inactive_weights():
    """Over 4000 keys each previously inactive weight is regrown with probability n / inactive
    (binomial counts, chi-square), never an active or a just-pruned one."""
    size, n_active, fraction = 40, 10, 0.1
    m = {"kernel": jnp.arange(size).reshape(4, 10) < n_active}
    s = {"kernel": jnp.arange(size, dtype=jnp.float32).reshape(4, 10)}
    g = {"kernel": jnp.zeros((4, 10))}
    n = round(fraction * size)  # 4 pruned (the lowest scores: indices 0..3), 4 regrown

    def one(key):
        return masks.prune_and_regrow(m, s, g, fraction=fraction, key=key, regrow="random")[1]

    keys = jax.random.split(jax.random.key(0), 4000)
    grown = np.asarray(jax.jit(jax.vmap(one))(keys)["kernel"]).reshape(4000, size)
    assert np.all(grown.sum(axis=1) == n)
    assert not grown[:, :n_active].any()  # never an active (or just pruned) weight
    counts = grown[:, n_active:].sum(axis=0)
    p = n / (size - n_active)
    expected = 4000 * p
    chi2 = float(np.sum((counts - expected) ** 2 / (expected * (1 - p))))
    # 30 cells (approximately independent): the 99.9% quantile of chi2(30) is 59.7.
    assert chi2 < 59.7, (chi2, counts)
    # Across calls the choice changes (a key per update) and covers every inactive weight.
    assert (counts > 0).all()
