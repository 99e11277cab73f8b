"""Step time of sdp_transform against plain SGD and optax.contrib.sam, in a user's own loop.

One jitted train step per optimizer (params and state donated and carried over, as in a
training loop), timed after compilation: the median over `--repeats` calls (each blocked until
ready) on a fixed batch of `--batch` examples, for an MLP
784-512-512-10 and a small CNN (28x28x1 -> conv 32 -> conv 64, stride 2 -> dense 128 -> 10).
Rows:
  sgd            plain SGD (one forward/backward)
  sam            optax.contrib.sam(sgd, chain(normalize(), sgd(rho)), opaque_mode=True)
  sdp            keep_sparse(chain(sdp_transform(0.9, rho), sgd)), masks refreshed by the loop
  sdp every=100  the same with mask_update_every_steps=100, on steps that do not update masks
                 (counts 1 to repeats + 4 < 100)
  sdp mask step  what a step that updates masks costs (mask_update_every_steps=1)
  sdp rho=0      keep_sparse(chain(sdp_transform(0.9, 0), sgd)), no grad_fn (no SAM)
The rows are timed interleaved (one call of each per round). Prints a markdown table (ms per
step, and ratios to sgd and to sam). With the default prunable filter (structural) the first
layer and the logits layer stay dense: the MLP prunes its 512x512 layer, the CNN its second
convolution and first dense layer.

    python -m experiments.bench.sdp --repeats=50
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esacl_jax.sdp import find_sdp_state, keep_sparse, replace_sdp_state, sdp_transform


def init_mlp(key: jax.Array) -> dict:
    sizes = (784, 512, 512, 10)
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def apply_mlp(params: dict, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i in range(3):
        x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        if i < 2:
            x = jax.nn.relu(x)
    return x


def init_cnn(key: jax.Array) -> dict:
    k = jax.random.split(key, 4)
    return {
        "conv0": {"kernel": jax.random.normal(k[0], (3, 3, 1, 32)) / 3.0, "bias": jnp.zeros(32)},
        "conv1": {"kernel": jax.random.normal(k[1], (3, 3, 32, 64)) / np.sqrt(288),
                  "bias": jnp.zeros(64)},
        "dense0": {"kernel": jax.random.normal(k[2], (14 * 14 * 64, 128)) / np.sqrt(12544),
                   "bias": jnp.zeros(128)},
        "dense1": {"kernel": jax.random.normal(k[3], (128, 10)) / np.sqrt(128),
                   "bias": jnp.zeros(10)},
    }


def apply_cnn(params: dict, x: jax.Array) -> jax.Array:
    dims = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, params["conv0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=dims) + params["conv0"]["bias"]
    x = jax.nn.relu(x)
    x = jax.lax.conv_general_dilated(x, params["conv1"]["kernel"], (2, 2), "SAME",
                                     dimension_numbers=dims) + params["conv1"]["bias"]
    x = jax.nn.relu(x).reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
    return x @ params["dense1"]["kernel"] + params["dense1"]["bias"]


MODELS = {"mlp 784-512-512-10": (init_mlp, apply_mlp), "cnn": (init_cnn, apply_cnn)}


def make_steps(apply_fn, lr: float, rho: float, sparsity: float) -> dict:
    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()

    grad = jax.grad(loss)
    sgd = optax.sgd(lr)

    def plain(tx):
        def step(params, state, x, y):
            updates, state = tx.update(grad(params, x, y), state, params)
            return optax.apply_updates(params, updates), state
        return tx, step

    def with_grad_fn(tx, two_args=False):
        def step(params, state, x, y):
            if two_args:
                grad_fn = lambda p, _: grad(p, x, y)  # noqa: E731
            else:
                grad_fn = lambda p: grad(p, x, y)  # noqa: E731
            updates, state = tx.update(grad(params, x, y), state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state
        return tx, step

    sam = optax.contrib.sam(sgd, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                            sync_period=2, opaque_mode=True)
    return {
        "sgd": plain(sgd),
        "sam": with_grad_fn(sam, two_args=True),
        "sdp": with_grad_fn(keep_sparse(optax.chain(sdp_transform(sparsity, rho), sgd))),
        "sdp every=100": with_grad_fn(keep_sparse(optax.chain(
            sdp_transform(sparsity, rho, mask_update_every_steps=100), sgd))),
        "sdp mask step": with_grad_fn(keep_sparse(optax.chain(
            sdp_transform(sparsity, rho, mask_update_every_steps=1), sgd))),
        "sdp rho=0": plain(keep_sparse(optax.chain(sdp_transform(sparsity, 0.0), sgd))),
    }


def time_steps(steps: dict, params, x, y, repeats: int) -> dict[str, float]:
    """Median seconds of one call of each compiled step, run as a training loop does: params and
    optimizer state are donated and carried from call to call. The calls are interleaved, one of
    each optimizer per round, so that a change of machine load hits every row alike."""
    compiled, carry = {}, {}
    for label, (tx, step, count) in steps.items():
        p = jax.tree.map(jnp.copy, params)
        state = tx.init(p)
        if count is not None:
            sdp = find_sdp_state(state)
            state = replace_sdp_state(state, sdp._replace(count=jnp.asarray(count, jnp.int32)))
        compiled[label] = jax.jit(step, donate_argnums=(0, 1))
        carry[label] = (p, state)
        for _ in range(4):  # compile, then warm up
            carry[label] = jax.block_until_ready(compiled[label](*carry[label], x, y))
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, fn in compiled.items():
            start = time.perf_counter()
            carry[label] = jax.block_until_ready(fn(*carry[label], x, y))
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    if args.repeats + 4 >= 100:
        parser.error("--repeats must be < 96 (the 'sdp every=100' row must not update masks)")

    rows = []
    for name in args.models.split(","):
        init_fn, apply_fn = MODELS[name]
        key_p, key_x = jax.random.split(jax.random.key(0))
        params = init_fn(key_p)
        x = jax.random.normal(key_x, (args.batch, 28, 28, 1))
        y = jnp.arange(args.batch) % 10
        steps = {
            label: (tx, step, {"sdp every=100": 1, "sdp mask step": 1}.get(label))
            for label, (tx, step) in make_steps(apply_fn, 0.05, args.rho, args.sparsity).items()
        }
        results = time_steps(steps, params, x, y, args.repeats)
        for label, seconds in results.items():
            rows.append((name, label, 1e3 * seconds, seconds / results["sgd"],
                         seconds / results["sam"]))

    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}, batch {args.batch}, sparsity "
          f"{args.sparsity}, rho {args.rho}, median of {args.repeats}")
    print()
    print("| model | optimizer | ms / step | x sgd | x optax sam |")
    print("|---|---|---:|---:|---:|")
    for name, label, ms, vs_sgd, vs_sam in rows:
        print(f"| {name} | {label} | {ms:.2f} | {vs_sgd:.2f} | {vs_sam:.2f} |")


if __name__ == "__main__":
    main()
