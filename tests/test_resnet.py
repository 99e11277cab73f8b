"""CIFAR ResNet-18 and SmallCNN: shapes, parameter counts, naming, BatchNorm modes, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax.harness.flops import path_to_str
from esacl_jax.harness.models.cnn import SmallCNN
from esacl_jax.harness.models.resnet import ResNet18


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_resnet18_param_count_matches_pytorch():
    model = ResNet18(num_classes=10, nf=64)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert _count(variables["params"]) == 11_173_962  # PyTorch CIFAR ResNet-18, 10 classes
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    kernels = [path_to_str(p) for p, _ in flat if path_to_str(p).endswith("kernel")]
    excluded = ("stem", "shortcut", "classifier")
    block_convs = [p for p in kernels if not any(e in p for e in excluded)]
    assert len(block_convs) == 16
    assert all(p.split("/")[0].startswith("block") and p.split("/")[1] in ("conv1", "conv2")
               for p in block_convs)
    assert "block1_0/conv1/kernel" in block_convs and "block4_1/conv2/kernel" in block_convs
    assert {p for p in kernels if "shortcut" in p} == {
        f"block{s}_0/shortcut_conv/kernel" for s in (2, 3, 4)
    }
    assert "stem_conv/kernel" in kernels and "classifier/kernel" in kernels


def test_resnet18_small_forward_bn_modes_and_jit():
    model = ResNet18(num_classes=7, nf=8)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    # jit: an eager init compiles each initializer separately (~2x slower on CPU)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    stats = variables["batch_stats"]

    logits_train, updated = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    assert logits_train.shape == (2, 7) and logits_train.dtype == jnp.float32
    assert jax.tree.structure(updated["batch_stats"]) == jax.tree.structure(stats)
    # train mode moves the running statistics: new = 0.9 * old + 0.1 * batch statistic
    old = stats["stem_bn"]["mean"]
    new = updated["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(old, new)
    stem = jax.lax.conv_general_dilated(
        x, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(new, 0.9 * old + 0.1 * stem.mean(axis=(0, 1, 2)), atol=1e-5)

    # eval mode (jit-compiled) must leave them untouched
    logits, same = jax.jit(
        lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"])
    )(variables, x)
    assert logits.shape == (2, 7)
    jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], stats)
    # eval uses the running statistics (fresh init: mean 0, var 1), so it differs from train
    assert not np.allclose(logits, logits_train)


def test_small_cnn_shapes_and_param_count():
    model = SmallCNN(num_classes=10)
    x = jnp.zeros((3, 784))  # flattened MNIST layout -> 28x28x1
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    assert set(variables) == {"params"}
    assert set(variables["params"]) == {"stem_conv", "conv1", "hidden", "classifier"}
    # stem 3*3*1*32 + 32 = 320; conv1 3*3*32*64 + 64 = 18496; after two 2x pools 7*7*64 = 3136:
    # hidden 3136*128 + 128 = 401536; classifier 128*10 + 10 = 1290 -> 421642
    assert _count(variables["params"]) == 421_642
    out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    assert out.shape == (3, 10)
    img = jax.eval_shape(model.apply, variables, jnp.zeros((2, 28, 28, 1)))  # image layout
    assert img.shape == (2, 10)
    rgb = SmallCNN(num_classes=4, features=(8, 8), dense=16)
    v = jax.eval_shape(rgb.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.eval_shape(rgb.apply, v, jnp.zeros((5, 32, 32, 3))).shape == (5, 4)


def test_mlp_init_is_xavier_uniform_with_zero_biases_by_default():
    """The MNIST-family MLP starts as the reference protocol's (torch xavier_uniform_, bias 0)."""
    from esacl_jax.harness.models import build_model

    x = jnp.zeros((1, 28, 28, 1))
    params = build_model("mlp", 10).init(jax.random.key(0), x)["params"]
    for name, fan_in, fan_out in (("stem", 784, 100), ("hidden_1", 100, 100),
                                  ("classifier", 100, 10)):
        kernel = np.asarray(params[name]["kernel"])
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert kernel.shape == (fan_in, fan_out)
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
        assert np.var(kernel) == pytest.approx(bound**2 / 3, rel=0.1)  # uniform(-b, b)
        assert np.all(np.asarray(params[name]["bias"]) == 0.0)
    lecun = build_model("mlp", 10, mlp_init="lecun_normal").init(jax.random.key(0), x)["params"]
    stem = np.asarray(lecun["stem"]["kernel"])
    assert np.var(stem) == pytest.approx(1.0 / 784, rel=0.1)  # flax's default, a smaller scale
    with pytest.raises(ValueError, match="mlp_init"):
        build_model("mlp", 10, mlp_init="kaiming").init(jax.random.key(0), x)
