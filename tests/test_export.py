"""esacl_jax.export: compact files that round-trip exactly; the harness's sparse_model.npz."""

from __future__ import annotations

import collections
import errno
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax import export, masks
from esacl_jax.harness import export_model


def same_bits(a, b) -> bool:
    """Equal dtype, shape and bytes (stricter than ==: -0.0 vs 0.0 and NaNs count)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert same_bits(x, y), (np.asarray(x).dtype, np.asarray(y).dtype)


def stored_kinds(path) -> dict[str, bool]:
    """Leaf path -> stored sparse?, read from the file's metadata."""
    with np.load(path) as data:
        meta = json.loads(bytes(data[export.META_KEY]))
    return {leaf["path"]: bool(leaf.get("sparse")) for leaf in meta["leaves"]}


def nested_tree(dtype=jnp.float32):
    """A nested tree (dicts, a list, a tuple) with two prunable kernels, pruned at 0.8."""
    rng = np.random.default_rng(0)  # numpy: no PRNG compilation in the tests

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(dtype))

    params = {
        "encoder": {"layers": [{"kernel": normal(12, 8), "bias": normal(8)}],
                    "scale": jnp.asarray(1.5, dtype)},
        "conv": (normal(3, 3, 2, 4), jnp.zeros((4,), dtype)),
        "step": jnp.asarray(7, jnp.int32),
    }
    prunable = jax.tree.map(lambda x: x.ndim >= 2, params)
    sparsities = masks.layer_sparsities(params, 0.8, prunable=prunable)
    weight_masks = masks.magnitude_masks(params, sparsities, prunable)
    return masks.apply_masks(params, weight_masks), weight_masks


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_is_exact_and_pruned_entries_are_zero(tmp_path, dtype):
    params, weight_masks = nested_tree(dtype)
    path = tmp_path / "model.npz"
    nbytes = export.save_sparse(path, params, weight_masks)
    assert nbytes == path.stat().st_size
    loaded, loaded_masks = export.load_sparse(path, with_masks=True)
    assert_same_tree(loaded, params)  # no template needed: structure and dtypes from the file
    assert np.asarray(loaded["encoder"]["layers"][0]["kernel"]).dtype == np.dtype(dtype)
    kernel = np.asarray(loaded["encoder"]["layers"][0]["kernel"])
    mask = np.asarray(weight_masks["encoder"]["layers"][0]["kernel"])
    assert np.all(kernel[~mask] == 0) and np.count_nonzero(kernel) == mask.sum()
    # The stored masks follow the masks convention: the same masks come back.
    assert_same_tree(loaded_masks, jax.tree.map(np.asarray, weight_masks))
    kinds = stored_kinds(path)
    assert kinds == {"['conv'][0]": True, "['conv'][1]": False, "['encoder']['layers'][0]['bias']":
                     False, "['encoder']['layers'][0]['kernel']": True,
                     "['encoder']['scale']": False, "['step']": False}
    export.save_dense(tmp_path / "dense.npz", params)  # (too small a tree to be smaller)
    assert not any(stored_kinds(tmp_path / "dense.npz").values())
    assert_same_tree(export.load_sparse(tmp_path / "dense.npz"), params)


def test_scalar_masks_and_no_masks(tmp_path):
    params, _ = nested_tree()
    # Every mask scalar: everything dense, nothing lost.
    export.save_sparse(tmp_path / "a.npz", params, jax.tree.map(lambda _: jnp.ones((), bool),
                                                                  params))
    assert not any(stored_kinds(tmp_path / "a.npz").values())
    assert_same_tree(export.load_sparse(tmp_path / "a.npz"), params)
    # masks=None: leaves of ndim >= 2 with enough exact zeros are stored compactly.
    export.save_sparse(tmp_path / "b.npz", params)
    kinds = stored_kinds(tmp_path / "b.npz")
    assert kinds["['conv'][0]"] and kinds["['encoder']['layers'][0]['kernel']"]
    assert not kinds["['conv'][1]"]  # 1-D: dense whatever its zeros
    dense_kernel = {"w": jnp.ones((16, 16)), "z": jnp.zeros((16, 16))}
    export.save_sparse(tmp_path / "c.npz", dense_kernel)
    assert stored_kinds(tmp_path / "c.npz") == {"['w']": False, "['z']": True}
    assert_same_tree(export.load_sparse(tmp_path / "c.npz"), dense_kernel)


def test_weights_outside_the_mask_are_kept_bit_for_bit(tmp_path):
    w = np.zeros((4, 4), np.float32)
    w[0, 0], w[1, 1], w[2, 2], w[3, 3] = 1.0, -0.0, np.nan, 5.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[0, 1] = True  # an active weight may be exactly 0 ([0, 1])
    export.save_sparse(tmp_path / "m.npz", {"w": w}, {"w": mask})
    loaded, loaded_masks = export.load_sparse(tmp_path / "m.npz", with_masks=True)
    assert same_bits(loaded["w"], w)
    assert loaded_masks["w"].sum() == 5  # the mask plus the three nonzero bit patterns


def test_other_dtypes_round_trip(tmp_path):
    tree = {"int4": np.array([[1, -2, 0], [0, 0, 7]], dtype=jnp.int4),
            "fp8": np.zeros((8, 8), dtype=jnp.float8_e4m3fn),
            "i8": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
            "b": np.eye(9, dtype=bool), "f64": np.float64(0.25), "py": 3}
    tree["fp8"][2, 3] = 1.5
    export.save_sparse(tmp_path / "d.npz", tree)
    loaded = export.load_sparse(tmp_path / "d.npz")
    for name in ("int4", "fp8", "i8", "b", "f64"):
        assert same_bits(loaded[name], tree[name]), name
    assert loaded["py"] == 3


Pair = collections.namedtuple("Pair", ["dense", "sparse"])


def test_like_unflattens_into_the_given_structure(tmp_path):
    params, weight_masks = nested_tree()
    export.save_sparse(tmp_path / "m.npz", params, weight_masks)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert_same_tree(export.load_sparse(tmp_path / "m.npz", like=like), params)

    # A container the file cannot describe (a namedtuple) loads with like= only.
    tree = Pair(dense=np.ones(3, np.float32), sparse=np.diag(np.arange(5.0)))
    export.save_sparse(tmp_path / "p.npz", tree)
    with pytest.raises(ValueError, match="like="):
        export.load_sparse(tmp_path / "p.npz")
    loaded = export.load_sparse(tmp_path / "p.npz", like=tree)
    assert isinstance(loaded, Pair)
    assert_same_tree(loaded, tree)

    with pytest.raises(ValueError, match="leaves"):
        export.load_sparse(tmp_path / "m.npz", like={"a": np.zeros(3)})
    other = jax.tree.map(lambda x: x, params)
    other["encoder"]["scale"] = np.zeros((2,))
    with pytest.raises(ValueError, match="shape"):
        export.load_sparse(tmp_path / "m.npz", like=other)


def test_missing_or_corrupt_files_give_a_one_line_error(tmp_path):
    params, weight_masks = nested_tree()
    good = tmp_path / "good.npz"
    export.save_sparse(good, params, weight_masks)
    data = good.read_bytes()

    with pytest.raises(FileNotFoundError, match="no sparse model file"):
        export.load_sparse(tmp_path / "missing.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside a member's data: zip's CRC check catches it
    broken = {"truncated.npz": data[: len(data) // 2], "empty.npz": b"",
              "text.npz": b"not a model\n", "flipped.npz": bytes(flipped)}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    for name in [*broken, "array.npy", "other.npz"]:
        with pytest.raises(export.SparseFileError) as info:
            export.load_sparse(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and name in message, message


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    params, weight_masks = nested_tree()
    path = tmp_path / "model.npz"
    export.save_sparse(path, params, weight_masks)
    before = path.read_bytes()

    def disk_full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export.np, "savez", disk_full)
    with pytest.raises(OSError, match="cannot write") as info:
        export.save_sparse(path, jax.tree.map(jnp.zeros_like, params), weight_masks)
    assert "\n" not in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left


# ----------------------------------------------------------------------------- the MNIST MLP


PRUNABLE = {"stem": {"kernel": True, "bias": False}, "hidden_1": {"kernel": True, "bias": False},
            "classifier": {"kernel": False, "bias": False}}  # every kernel but the classifier


def split_mnist_mlp(dtype=jnp.float32):
    """784-100-100-10 params (the harness's layer names), 90% of every kernel but the
    classifier's pruned by magnitude, and their masks."""
    sizes, names = (784, 100, 100, 10), ("stem", "hidden_1", "classifier")
    rng = np.random.default_rng(1)
    params = {n: {"kernel": jnp.asarray((rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)),
                  "bias": jnp.asarray((0.1 * rng.standard_normal(b)).astype(dtype))}
              for n, a, b in zip(names, sizes[:-1], sizes[1:], strict=True)}
    weight_masks = masks.magnitude_masks(
        params, masks.layer_sparsities(params, 0.9, prunable=PRUNABLE), PRUNABLE)
    return masks.apply_masks(params, weight_masks), weight_masks


def mlp_apply(params, x):
    for name in ("stem", "hidden_1"):
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["classifier"]["kernel"] + params["classifier"]["bias"]


@pytest.mark.parametrize("dtype, bound", [(jnp.float32, 0.16), (jnp.bfloat16, 0.2)])
def test_mlp_at_90_percent_is_small_and_predicts_the_same(tmp_path, dtype, bound):
    params, weight_masks = split_mnist_mlp(dtype)
    summary = masks.sparsity_summary(weight_masks)
    assert summary["prunable_sparsity"] == pytest.approx(0.9)
    nbytes = export.save_sparse(tmp_path / "sparse.npz", params, weight_masks)
    dense_bytes = export.save_dense(tmp_path / "dense.npz", params)
    # f32: 0.1 * 4 + 1/8 bytes per pruned-layer weight, the 100x10 classifier and biases dense
    assert nbytes / dense_bytes <= bound, nbytes / dense_bytes
    loaded = export.load_sparse(tmp_path / "sparse.npz")
    assert_same_tree(loaded, params)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((64, 784)).astype(dtype))
    apply = jax.jit(mlp_apply)
    original = np.asarray(apply(params, x))
    reloaded = np.asarray(apply(jax.tree.map(jnp.asarray, loaded), x))
    assert same_bits(original, reloaded)
    assert np.array_equal(original.argmax(-1), reloaded.argmax(-1))


def test_masks_from_sdp_transform_init(tmp_path):
    from esacl_jax import sdp

    params, _ = split_mnist_mlp()
    state = sdp.sdp_transform(sparsity=0.9, rho=0.05, prunable=PRUNABLE).init(params)
    weight_masks = sdp.find_sdp_state(state).masks
    params = masks.apply_masks(params, weight_masks)
    nbytes = export.save_sparse(tmp_path / "s.npz", params, weight_masks)
    assert nbytes / export.save_dense(tmp_path / "d.npz", params) <= 0.16
    loaded, loaded_masks = export.load_sparse(tmp_path / "s.npz", with_masks=True)
    assert_same_tree(loaded, params)
    assert_same_tree(loaded_masks, jax.tree.map(np.asarray, weight_masks))


# ----------------------------------------------------------------------------- the harness


def test_a_sparse_run_writes_its_model_beside_results_json(tmp_path):
    from esacl_jax.harness.loop import train_and_evaluate
    from experiments.configs import split_digits

    config = split_digits.get_config("esacl")
    config.progress = config.tensorboard = False
    config.num_tasks, config.epochs = 1, 1  # the run's compilation is most of its time
    captured = {}

    def capture(task_id, method, state):
        captured["method"], captured["state"] = method, state

    result = train_and_evaluate(config, tmp_path, progress=False, on_task_end=capture)
    written = json.loads((tmp_path / "results.json").read_text())["sparse_export"]
    assert written == result["sparse_export"]
    assert written["file"] == "sparse_model.npz"
    assert written["bytes"] == (tmp_path / "sparse_model.npz").stat().st_size
    assert written["bytes"] < written["dense_bytes"]
    assert written["ratio"] == pytest.approx(written["bytes"] / written["dense_bytes"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dense-size")]
    method, state = captured["method"], captured["state"]
    loaded, loaded_masks = export.load_sparse(tmp_path / "sparse_model.npz", like=state.params,
                                              with_masks=True)
    assert_same_tree(loaded, state.params)
    assert_same_tree(loaded_masks, jax.tree.map(np.asarray, method.sparse_masks(state)))


def test_export_is_skipped_for_dense_methods_and_survives_a_failed_write(tmp_path, capfd):
    params, weight_masks = split_mnist_mlp()
    state = types.SimpleNamespace(params=params)

    def method(masks_):
        return types.SimpleNamespace(sparse_masks=lambda s: masks_,
                                     eval_variables=lambda s: (s.params, {}))

    assert export_model.export_sparse_model(tmp_path, method(None), state) is None
    assert not any(tmp_path.iterdir())

    entry = export_model.export_sparse_model(tmp_path, method(weight_masks), state)
    assert entry["bytes"] / entry["dense_bytes"] <= 0.16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse_model.npz"]

    blocker = tmp_path / "file"
    blocker.write_text("x")
    entry = export_model.export_sparse_model(blocker, method(weight_masks), state)
    assert entry["file"] is None and "cannot write" in entry["error"]
    assert "sparse model export" in capfd.readouterr().err
