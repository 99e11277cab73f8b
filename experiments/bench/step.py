"""Step cost of the library's EsaCL against a DER++ step of the same model and batch.

    python -m experiments.bench.step [--steps=500] [--repeats=5] [--out=docs/speed/step.md]

Both steps are written with the library alone, as a user's loop would (docs/OWN_LOOP.md "EsaCL
in your own training loop"): a plain-JAX MLP, `esacl_jax.replay.der_loss` + `er_loss` on two
replay minibatches as large as the batch from the reservoir buffer (`sample`, `add_reservoir`),
plain SGD for DER++ and `esacl_optimizer(sgd)` + `esacl_gradients` with the score table for
EsaCL. `--steps` steps run inside one compiled `lax.scan` (no Python dispatch), timed after
compilation; the best of `--repeats` is kept. Rows that remove one part of EsaCL's step say
where its extra time goes:
- "no ascent (rho 0)": the step without SAM's clean pass and perturbation;
- "no score table (gamma 1, no IDS)": variant B with every example kept, no table;
- "SDP optimizer only": the DER++ step through `esacl_optimizer` (masked SGD, score averages).
The "model" column is METHOD.md's cost model (forward 1, forward+backward 3 per example), the
ratio EsaCL / DER++ it predicts when every pass costs its FLOPs.
"""

from __future__ import annotations

import functools
import math
import platform
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import esacl_jax as ecl

_STEPS = flags.DEFINE_integer("steps", 500, "Steps per compiled scan.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (best kept).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown table to this file.")
_CASES = flags.DEFINE_list("cases", ["784-400-400-10@10", "784-512-512-10@128"],
                           "MLP widths @ batch size.")

BUFFER, NUM_CLASSES = 500, 10


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) / math.sqrt(m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def forward(params: list[dict], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params: list[dict], rows: tuple) -> tuple[jax.Array, jax.Array]:
    logits = forward(params, rows[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, rows[1]), logits


def replay_loss(params: list[dict], buffer: ecl.replay.ReplayBuffer, key: jax.Array,
                batch: int) -> jax.Array:
    """DER++: alpha = 1 logit MSE on one replay minibatch, beta = 0.5 CE on another."""
    (bx, _, bl, _, ok), (cx, cy, _, _, ok2) = (ecl.replay.sample(buffer, k, batch)
                                               for k in jax.random.split(key))
    return (ecl.replay.der_loss(forward(params, bx), bl, ok)
            + 0.5 * ecl.replay.er_loss(forward(params, cx), cy, ok2))


def make_step(kind: str, tx: optax.GradientTransformation, batch: int):
    """One training step `(carry, (x, y, idx, key)) -> (carry, loss)` of the given kind."""

    def step(carry: tuple, inputs: tuple) -> tuple[tuple, jax.Array]:
        params, opt_state, buffer, table = carry
        x, y, idx, key = inputs
        replay_key, insert_key = jax.random.split(key)
        replay = functools.partial(replay_loss, buffer=buffer, key=replay_key, batch=batch)
        if kind in ("derpp", "sdp_only"):
            def objective(p):
                per_example, logits = loss_fn(p, (x, y))
                return per_example.mean() + replay(p), logits

            (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
            extra = {"grad_fn": lambda _: grads} if kind == "sdp_only" else {}
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
        else:
            options = dict(esacl=dict(table=table, example_index=idx),
                           no_ascent=dict(table=table, example_index=idx),
                           no_table=dict(gamma=1.0))[kind]
            g = ecl.esacl_gradients(loss_fn, params, (x, y), opt_state,
                                    replay_loss_fn=replay, **options)
            updates, opt_state = tx.update(g.ascent_grads, opt_state, params, grad_fn=g.grad_fn)
            loss, logits = g.loss, g.aux
            table = g.table if kind != "no_table" else table
        buffer = ecl.replay.add_reservoir(buffer, insert_key, x, y, jax.lax.stop_gradient(logits))
        return (optax.apply_updates(params, updates), opt_state, buffer, table), loss

    return step


def time_case(kind: str, sizes: tuple[int, ...], batch: int, steps: int, repeats: int) -> float:
    """Best microseconds per step over `repeats` compiled scans of `steps` steps."""
    params = init_mlp(jax.random.key(0), sizes)
    tx = optax.sgd(0.03) if kind == "derpp" else ecl.esacl_optimizer(
        optax.sgd(0.03), rho=0.0 if kind == "no_ascent" else ecl.ESACL_DEFAULTS["rho"])
    opt_state = tx.init(params)
    if kind != "derpp":
        params = ecl.sparse_start(params, opt_state)
    buffer = ecl.replay.init_buffer(BUFFER, (sizes[0],), jnp.float32, NUM_CLASSES)
    table = ecl.init_example_stats(steps * batch)
    kx, ky, ks = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(kx, (steps, batch, sizes[0]))
    ys = jax.random.randint(ky, (steps, batch), 0, NUM_CLASSES)
    idx = jnp.arange(steps * batch, dtype=jnp.int32).reshape(steps, batch)
    keys = jax.random.split(ks, steps)
    run = jax.jit(lambda carry: jax.lax.scan(make_step(kind, tx, batch), carry,
                                             (xs, ys, idx, keys)))
    carry = (params, opt_state, buffer, table)
    jax.block_until_ready(run(carry))  # compile, and one warm-up pass
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(carry))
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / steps


def model_ratio(batch: int, gamma: float = ecl.ESACL_DEFAULTS["gamma"]) -> float:
    """EsaCL / DER++ in METHOD.md's cost model: (3 k + 3 B + 6 B) / (3 B + 6 B)."""
    k = ecl.ids.num_selected(batch, gamma)
    return (3 * k + 9 * batch) / (9 * batch)


ROWS = (("DER++ (dense SGD)", "derpp"), ("EsaCL (library default, variant C)", "esacl"),
        ("EsaCL, no ascent (rho 0)", "no_ascent"),
        ("EsaCL, no score table (gamma 1, no IDS)", "no_table"),
        ("DER++ step through the SDP optimizer", "sdp_only"))


def main(argv: list[str]) -> None:
    del argv
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [f"Step cost, µs per step (best of {_REPEATS.value} scans of {_STEPS.value} steps); "
             f"commit {commit}, jax {jax.__version__} on {jax.devices()[0].platform} "
             f"({platform.machine()}, {jax.device_count()} device(s)).", ""]
    for case in _CASES.value:
        widths, batch = case.split("@")
        sizes, batch = tuple(int(w) for w in widths.split("-")), int(batch)
        times: dict[str, Any] = {}
        for _, kind in ROWS:
            times[kind] = time_case(kind, sizes, batch, _STEPS.value, _REPEATS.value)
        lines += [f"MLP {widths}, batch {batch} (+ two replay minibatches of {batch}); cost "
                  f"model EsaCL / DER++ = {model_ratio(batch):.3f}", "",
                  "| step | µs / step | / DER++ |", "|---|---:|---:|"]
        lines += [f"| {label} | {times[kind]:.0f} | {times[kind] / times['derpp']:.2f} |"
                  for label, kind in ROWS]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
