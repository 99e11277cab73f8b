"""Memory footprint: byte counts computed by hand on tiny pytrees and a tiny CNN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax import replay
from esacl_jax.harness import memory
from esacl_jax.harness.models.cnn import SmallCNN


def test_analytic_footprint_by_hand():
    params = {
        "layer": {"kernel": jnp.zeros((4, 4), jnp.float32), "bias": jnp.zeros((3,), jnp.float32)},
        "half": {"kernel": jnp.zeros((17,), jnp.bfloat16)},
    }
    mask = np.zeros((4, 4), bool)
    mask.flat[:6] = True
    half_mask = np.zeros((17,), bool)
    half_mask[:5] = True
    # Same structure as params, None where unmasked (the bias).
    masks = {"layer": {"kernel": mask, "bias": None}, "half": {"kernel": half_mask}}
    opt_state = (jnp.zeros((4, 4), jnp.float32), jnp.zeros((), jnp.int32))
    buf = replay.init_buffer(2, (3,), jnp.uint8, 4)
    out = memory.analytic_footprint(params, masks, opt_state, buf, activation_bytes=100)
    # weights: layer kernel 6 nonzero * 4 B = 24; bias 3 * 4 = 12; half 5 * 2 B = 10 -> 46
    assert out["weights"] == 46
    # mask bits: ceil(16 / 8) = 2; ceil(17 / 8) = 3 -> 5
    assert out["masks"] == 5
    assert out["params"] == 51
    # dense: 16 * 4 + 3 * 4 + 17 * 2 = 64 + 12 + 34 = 110
    assert out["dense_params"] == 110
    # opt state: 16 * 4 + 4 = 68
    assert out["opt_state"] == 68
    # buffer: x 2*3*1 = 6, y 2*4 = 8, logits 2*4*4 = 32, task_id 8, num_seen 4 -> 58
    assert out["buffer"] == 58
    assert out["activations"] == 100
    assert out["total"] == 51 + 68 + 58 + 100


def test_masks_as_subtree_and_abstract_params():
    params = {"a": jax.ShapeDtypeStruct((8,), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    masks = {"a": np.array([1, 0, 0, 0, 0, 0, 0, 1])}
    out = memory.analytic_footprint(params, masks)
    # a: 2 nonzero * 4 = 8 (+ 1 mask byte); b: 2 * 4 = 8
    assert out["weights"] == 16 and out["masks"] == 1 and out["total"] == 17
    assert memory.analytic_footprint(params)["weights"] == 40  # no masks: 10 * 4


def test_activation_bytes_per_example_small_cnn():
    model = SmallCNN(num_classes=10)
    x = jax.ShapeDtypeStruct((4, 784), jnp.float32)
    # input 784*4 = 3136; stem_conv out 28*28*32*4 = 100352; conv1 out (after a 2x pool)
    # 14*14*64*4 = 50176; hidden 128*4 = 512; classifier 10*4 = 40 -> 154216 per example
    assert memory.activation_bytes_per_example(model, None, x) == 154216


def test_peak_memory_reports_host_rss():
    out = memory.peak_memory()
    assert out["host_peak_rss_bytes"] > 10 * 2**20
    if jax.default_backend() == "cpu":
        assert out["device_peak_bytes"] is None
    else:
        assert out["device_peak_bytes"] is None or out["device_peak_bytes"] > 0
