"""How a run compiles its programs: each once, the rarely run ones cheaply, the large ones off the
critical path.

A split_mnist run on a CPU spends more time compiling than training its first task. Two things
cut that without changing a single result bit:

- `call_once` / `OneShot`: programs a run executes once or a few times (the train-state
  initialisation, the epoch shuffle) are compiled at XLA's lowest backend optimisation level on
  CPU. Their optimised compilation costs far more than their execution (the initialisation:
  about 1.3 s against 0.5 s, for a program that runs in milliseconds); what they compute is
  integer (threefry) and exact float arithmetic, so the outputs are the same bits (tested).
- `BackgroundCompile`: a large program (the training chunk, the prediction) is lowered and
  compiled from the shapes of its arguments in a thread while the main thread does other work;
  the first real call then finds it in JAX's compilation cache. Same program, same results; if
  the background attempt fails or its shapes differ, the first call compiles as before.

On other backends `call_once` compiles with the default options (their compilers differ, and
the CPU measurement is what motivated it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import jax

# XLA's backend (LLVM) optimisation level 0: compiles several times faster, runs slower.
ONE_SHOT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def one_shot_options() -> dict[str, Any]:
    """Compiler options for rarely run programs on the default backend ({}: the defaults)."""
    return dict(ONE_SHOT_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


def arg_spec(x: Any) -> Any:
    """The abstract value a jitted call is specialised on: shape, dtype, weak type and, for a
    committed array, its sharding (an uncommitted one follows the call)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    aval = getattr(x, "aval", None)
    weak = bool(getattr(aval, "weak_type", False))
    committed = getattr(x, "committed", False)
    return jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x), weak_type=weak,
                                sharding=x.sharding if committed else None)


def call_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)`` for a function a run calls once, compiled cheaply (see module)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=one_shot_options())(*args)


class OneShot:
    """A jitted function with static arguments whose compilations are kept per static key and
    compiled cheaply (see module): for programs run a few times a run, such as the epoch
    shuffle. ``OneShot(fn, static_argnames)(*args, **static)``."""

    def __init__(self, fn: Callable[..., Any], static_argnames: tuple[str, ...]):
        self._jitted = jax.jit(fn, static_argnames=static_argnames)
        self._compiled: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **static: Any) -> Any:
        key = (tuple(sorted(static.items())), tuple(arg_spec(a) for a in args))
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = self._jitted.lower(*args, **static).compile(
                    compiler_options=one_shot_options())
                self._compiled[key] = compiled
        return compiled(*args)

    def cache_size(self) -> int:
        """How many programs were compiled (one per static key and argument shapes)."""
        return len(self._compiled)

    def clear_cache(self) -> None:
        with self._lock:
            self._compiled.clear()


class BackgroundCompile:
    """Lowers and compiles ``jitted`` for the given argument specs in a daemon thread.

    `wait()` before the first real call, so that call finds the program compiled instead of
    compiling it a second time concurrently. A failure is silent: the first call then compiles
    (and reports) it itself.
    """

    def __init__(self, jitted: Any, *args: Any):
        specs = jax.tree.map(arg_spec, args)
        self._thread = threading.Thread(target=self._compile, args=(jitted, specs), daemon=True)
        self._thread.start()

    @staticmethod
    def _compile(jitted: Any, specs: tuple) -> None:
        try:
            jitted.lower(*specs).compile()
        except Exception:  # noqa: BLE001 - the first real call compiles (and reports) it
            pass

    def wait(self) -> None:
        self._thread.join()
