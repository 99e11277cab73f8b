"""esacl_jax.export: compact files that round-trip exactly; the harness's sparse_model.npz."""

from __future__ import annotations

import collections
import errno
import json
import os
import pathlib
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax import export, masks
from esacl_jax.harness import export_model

V1_FILE = pathlib.Path(__file__).parent / "data" / "export_v1.npz"


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


def every_dtype_tree():
    """(params, masks) in every storable dtype, no RNG (tests/data/export_v1.npz holds it, as
    the version-1 writer wrote it): sparse float32/bfloat16/float16/float8/float64/int8/bool
    kernels with -0.0 and NaN outside and an exact 0 inside the mask, dense int4, scalars."""
    k = ((np.arange(48, dtype=np.float32).reshape(12, 4) * 7) % 13 - 6) / 4  # exact zeros too
    mask = np.abs(k) >= 1.0
    kernel = np.where(mask, k, 0).astype(np.float32)
    kernel[11, 0], kernel[11, 1] = -0.0, np.nan  # outside the mask: stored as active
    mask[11, 3] = True  # an active weight that is exactly 0
    one = np.ones((), bool)
    params = {"dense": [{"kernel": kernel, "bias": np.linspace(-1, 1, 4).astype(np.float32)}],
              "half": (kernel.astype(jnp.bfloat16), kernel.astype(np.float16), np.float16(0.5)),
              "fp8": kernel.astype(jnp.float8_e4m3fn), "f64": kernel.astype(np.float64),
              "i8": np.where(mask, np.arange(48).reshape(12, 4) - 24, 0).astype(np.int8),
              "b": mask.copy(), "int4": np.array([[1, -2, 0], [0, 0, 7]], dtype=jnp.int4),
              "step": np.int32(7)}
    masks_ = {"dense": [{"kernel": mask, "bias": one}], "half": (mask, mask, one), "fp8": mask,
              "f64": mask, "i8": mask, "b": mask, "int4": one, "step": one}
    return params, masks_


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


def test_both_format_versions_round_trip_every_dtype_exactly(tmp_path):
    params, weight_masks = every_dtype_tree()
    # Version 1, as its writer wrote it (commit 883b19d: tests/data/export_v1.npz).
    loaded, loaded_masks = export.load_sparse(V1_FILE, with_masks=True)
    with np.load(V1_FILE) as data:
        assert json.loads(bytes(data[export.META_KEY]))["version"] == 1
    assert_same_tree(loaded, params)
    expected_masks = jax.tree.map(lambda m, x: np.asarray(m) | (np.asarray(x) != 0)
                                  if np.ndim(m) else np.asarray(m), weight_masks, params)
    expected_masks["dense"][0]["kernel"][11, :2] = True  # -0.0 and NaN are nonzero bits
    for leaf in ("fp8", "f64"):
        expected_masks[leaf][11, :2] = True
    expected_masks["half"] = tuple(expected_masks["half"][:2]) + (np.ones((), bool),)
    for m in (expected_masks["half"][0], expected_masks["half"][1]):
        m[11, :2] = True
    assert_same_tree(loaded_masks, expected_masks)
    # Version 2 (what save_sparse writes now): the same tree and masks back, bit for bit.
    export.save_sparse(tmp_path / "v2.npz", params, weight_masks)
    with np.load(tmp_path / "v2.npz") as data:
        assert json.loads(bytes(data[export.META_KEY]))["version"] == export.VERSION == 2
    loaded2, loaded_masks2 = export.load_sparse(tmp_path / "v2.npz", with_masks=True)
    assert_same_tree(loaded2, params)
    assert_same_tree(loaded_masks2, loaded_masks)
    for compressed in (False, True):
        export.save_dense(tmp_path / "dense.npz", params, compressed=compressed)
        assert not any(stored_kinds(tmp_path / "dense.npz").values())
        assert_same_tree(export.load_sparse(tmp_path / "dense.npz"), params)


def test_version_2_is_deflated_with_byte_planes_a_plain_numpy_reader_can_undo(tmp_path):
    params, weight_masks = split_mnist_mlp()
    path = tmp_path / "m.npz"
    export.save_sparse(path, params, weight_masks)
    with zipfile.ZipFile(path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    export.save_dense(tmp_path / "d.npz", params)
    with zipfile.ZipFile(tmp_path / "d.npz") as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    # The documented recipe: v (itemsize, k) uint8 byte planes, m packed bits.
    kernel = np.asarray(params["stem"]["kernel"])
    with np.load(path) as data:
        meta = json.loads(bytes(data[export.META_KEY]))
        i = [leaf["path"] for leaf in meta["leaves"]].index("['stem']['kernel']")
        planes, bits = data[f"v{i}"], data[f"m{i}"]
    assert planes.dtype == np.uint8 and planes.shape == (4, np.count_nonzero(kernel))
    w = np.zeros(kernel.size, np.float32)
    w[np.unpackbits(bits, count=kernel.size).astype(bool)] = planes.T.copy().view(np.float32)[:, 0]
    assert same_bits(w.reshape(kernel.shape), kernel)


def test_90_percent_sparse_layer_is_under_0_8_of_the_compressed_dense_file(tmp_path):
    """A realistic layer: 784x400 Gaussian weights, 90% pruned by magnitude (the deflated
    dense file is already ~0.13 of the raw one: its zeros cost little)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((784, 400)) / 28).astype(np.float32)
    mask = np.abs(w) >= np.quantile(np.abs(w), 0.9)
    params = {"kernel": np.where(mask, w, 0).astype(np.float32)}
    nbytes = export.save_sparse(tmp_path / "s.npz", params, {"kernel": mask})
    dense = export.save_dense(tmp_path / "d.npz", params)
    dense_compressed = export.save_dense(tmp_path / "dc.npz", params, compressed=True)
    assert dense_compressed < 0.2 * dense
    assert nbytes / dense_compressed < 0.8, nbytes / dense_compressed
    assert_same_tree(export.load_sparse(tmp_path / "s.npz"), params)


def test_bfloat16_values_are_lossy_smaller_and_restored_to_their_dtype(tmp_path):
    params, weight_masks = split_mnist_mlp()
    params["step"], weight_masks["step"] = np.int32(3), np.ones((), bool)
    lossless = export.save_sparse(tmp_path / "f32.npz", params, weight_masks)
    nbytes = export.save_sparse(tmp_path / "bf16.npz", params, weight_masks,
                                values_dtype="bfloat16")
    assert nbytes < 0.6 * lossless, (nbytes, lossless)
    loaded, loaded_masks = export.load_sparse(tmp_path / "bf16.npz", with_masks=True)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32)
                           if np.asarray(x).dtype == np.float32 else np.asarray(x), params)
    assert_same_tree(loaded, rounded)  # float32 again, values rounded to bfloat16, ints exact
    assert_same_tree(loaded_masks, jax.tree.map(np.asarray, weight_masks))
    with np.load(tmp_path / "bf16.npz") as data:
        meta = json.loads(bytes(data[export.META_KEY]))
    assert meta["lossy_values_dtype"] == "bfloat16"
    assert {leaf.get("stored_dtype") for leaf in meta["leaves"]} == {"bfloat16", None}
    with pytest.raises(ValueError, match="values_dtype") as info:
        export.save_sparse(tmp_path / "x.npz", params, weight_masks, values_dtype="float16")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.npz").exists()


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
    broken = {"truncated.npz": data[: len(data) // 2], "empty.npz": b"",
              "text.npz": b"not a model\n", "v1_truncated.npz": V1_FILE.read_bytes()[:-100]}
    with zipfile.ZipFile(good) as zf:  # a byte flipped inside each member's deflated data:
        for k, info in enumerate(zf.infolist()):  # zlib's or zip's CRC check catches it
            name_len, extra_len = np.frombuffer(data, "<u2", 2, info.header_offset + 26)
            start = info.header_offset + 30 + int(name_len) + int(extra_len)
            flipped = bytearray(data)
            flipped[start + info.compress_size // 2] ^= 0xFF
            broken[f"flipped{k}.npz"] = bytes(flipped)
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    with np.load(good) as data:
        members = dict(data)
    meta = json.loads(bytes(members[export.META_KEY]))
    members[export.META_KEY] = np.frombuffer(json.dumps({**meta, "version": 3}).encode(), np.uint8)
    np.savez_compressed(tmp_path / "future.npz", **members)  # a version this reader predates
    for name in [*broken, "array.npy", "other.npz", "future.npz"]:
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

    monkeypatch.setattr(export.np, "savez_compressed", disk_full)
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
    assert written["bytes"] < written["dense_compressed_bytes"] < written["dense_bytes"]
    assert written["ratio_compressed"] == pytest.approx(
        written["bytes"] / written["dense_compressed_bytes"])
    assert written["format_version"] == export.VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dense-size")]
    method, state = captured["method"], captured["state"]
    loaded, loaded_masks = export.load_sparse(tmp_path / "sparse_model.npz", like=state.params,
                                              with_masks=True)
    assert_same_tree(loaded, state.params)
    assert_same_tree(loaded_masks, jax.tree.map(np.asarray, method.sparse_masks(state)))

    # experiments.bench.eval_export: the exported model re-evaluated (it checks the run's own
    # class-IL) and its bfloat16 re-save, smaller and about as accurate.
    from experiments.bench import eval_export

    row = eval_export.evaluate_run(tmp_path)
    assert row["class_il_f32"] == result["metrics"]["class_il"]["average_accuracy"]
    assert row["bytes"]["bfloat16"] < row["bytes"]["lossless"] == written["bytes"]
    assert abs(row["class_il_bf16"] - row["class_il_f32"]) < 0.05


def test_eval_export_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    from experiments.bench import eval_export

    (tmp_path / "results.json").write_text("{}")
    assert eval_export.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "sparse_model.npz" in err
    (tmp_path / "sparse_model.npz").write_bytes(b"not a model")
    assert eval_export.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o.json").exists()


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
    assert entry["ratio_compressed"] < 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse_model.npz"]

    blocker = tmp_path / "file"
    blocker.write_text("x")
    entry = export_model.export_sparse_model(blocker, method(weight_masks), state)
    assert entry["file"] is None and "cannot write" in entry["error"]
    assert "sparse model export" in capfd.readouterr().err
