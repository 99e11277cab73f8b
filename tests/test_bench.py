"""The accelerator benchmark script runs on CPU with tiny settings and prints one row per method."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

METHOD_LABELS = ("finetune", "DER++", "EsaCL A", "EsaCL B", "EsaCL C", "SparCL-DER++")


def test_bench_gpu_tiny_cpu_run_has_a_row_per_method(tmp_path):
    # The MLP rows compile in seconds on CPU; the ResNet-18 rows are the same code path with
    # another model (compiling six ResNet-18 steps on CPU would take minutes).
    out = tmp_path / "bench_gpu.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.gpu", "--steps=3", "--resnet_nf=4",
         "--batch=8", "--repeats=1", "--suites=mlp", "--mlp_batches=8",
         "--train_per_task=64", "--data_dir=/nonexistent", f"--out={out}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("# Accelerator benchmark on CPU") and report in proc.stdout
    rows = [line for line in report.splitlines() if line.startswith("| split_fashion_mnist")]
    assert [row.split(" | ")[3] for row in rows] == list(METHOD_LABELS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "mlp" and cells[2] == "8"
        assert float(cells[4].replace(",", "")) > 0  # images/s
        assert cells[6] == "None"  # CPU keeps no device memory statistics


def test_patch_conv_matches_lax_convolution():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from esacl_jax.harness.models.cnn import patch_conv

    x = jax.random.normal(jax.random.key(0), (3, 9, 7, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    for strides, padding in [((1, 1), "SAME"), ((1, 1), "VALID"), ((1, 1), ((2, 0), (1, 1))),
                             ((2, 2), "SAME")]:  # the last one falls back to lax
        want = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
        got = patch_conv(x, w, strides, padding, dimension_numbers=dn)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Gradients agree too (the reason for the im2col form is the speed of the weight gradient).
    f = lambda conv: jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME",  # noqa: E731
                                                             dimension_numbers=dn))))(w)
    np.testing.assert_allclose(np.asarray(f(patch_conv)),
                               np.asarray(f(jax.lax.conv_general_dilated)), rtol=1e-4, atol=1e-4)


def test_cnn_width_follows_resnet_nf_and_default_is_unchanged():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from esacl_jax.harness.models import build_model
    from esacl_jax.harness.models.cnn import SmallCNN

    x = jnp.zeros((1, 28, 28, 1))
    shapes = lambda m: jax.tree.map(jnp.shape, m.init(jax.random.key(0), x)["params"])  # noqa: E731
    assert shapes(build_model("cnn", 10)) == shapes(SmallCNN(num_classes=10))
    small = shapes(build_model("cnn", 10, nf=16))
    assert small["stem_conv"]["kernel"] == (3, 3, 1, 8)
    assert small["conv1"]["kernel"] == (3, 3, 8, 16) and small["hidden"]["kernel"] == (784, 32)
    # im2col and XLA's convolution: the same parameters and function.
    xs = jax.random.uniform(jax.random.key(1), (4, 784))
    a, b = SmallCNN(num_classes=10, im2col=True), SmallCNN(num_classes=10, im2col=False)
    params = a.init(jax.random.key(2), xs)
    np.testing.assert_allclose(np.asarray(a.apply(params, xs)), np.asarray(b.apply(params, xs)),
                               rtol=1e-5, atol=1e-5)


def test_train_chunk_skips_invalid_steps_wherever_they_are():
    import jax
    import numpy as np

    from esacl_jax.harness import loop as train
    from esacl_jax.harness.config import get_config

    config = get_config("split_digits", "derpp")
    benchmark, method = train.build_config_method(config)
    run_chunk = train.make_train_chunk(method)
    x, y, ctx = train.task_arrays(benchmark, 0)
    idx = np.arange(40, dtype=np.int32).reshape(4, 10)
    # Steps 0 and 2 valid, in the middle and at the end of the chunk ...
    s1, m1 = run_chunk(method.init(jax.random.key(0)), x, y, idx,
                       np.array([True, False, True, False]), ctx)
    # ... equal the same two steps as a valid prefix.
    s2, m2 = run_chunk(method.init(jax.random.key(0)), x, y, idx[[0, 2, 1, 3]],
                       np.array([True, True, False, False]), ctx)
    assert int(s1.step) == int(s2.step) == 2
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loss1, loss2 = np.asarray(m1.loss), np.asarray(m2.loss)
    assert np.isnan(loss1[[1, 3]]).all() and np.isnan(loss2[[2, 3]]).all()
    np.testing.assert_array_equal(loss1[[0, 2]], loss2[[0, 1]])


def test_bench_step_tiny_run_has_every_row():
    """experiments/bench/step.py (the library EsaCL step against DER++) on a tiny MLP."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.step", "--steps=3", "--repeats=1",
         "--cases=784-8-8-10@4"], cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 5 and rows[0].startswith("| DER++") and rows[0].endswith("| 1.00 |")
    assert all(float(row.split("|")[2]) > 0 for row in rows)
