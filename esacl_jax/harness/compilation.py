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
- `BackgroundThreads`: the owner of those threads. A run opens one (`owned_threads`) and every
  thread the harness starts for it is recorded there; on every way the run ends (return,
  exception, signal) the owner first stops new work (a thread that has not reached XLA's
  compiler yet skips it) and then joins every thread, before the run returns or raises. An XLA
  compilation cannot be interrupted, so it is waited for: an interpreter that finalizes while a
  thread is inside XLA aborts ("terminate called after throwing ...", SIGABRT, exit status 134)
  instead of exiting with the run's own status. Threads started outside a run go to a
  process-wide owner joined by `atexit`, before the interpreter finalizes.

On other backends `call_once` compiles with the default options (their compilers differ, and
the CPU measurement is what motivated it).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
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


class BackgroundThreads:
    """The background threads of one run: recorded when started, all joined by `close`.

    `close` tells the threads to stop starting new work (`stopping`), then joins each of them;
    a signal that raises KeyboardInterrupt while it waits is held until every thread has ended
    and raised then, so no thread outlives the owner's `close`.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        _OWNERS.add(self)

    @property
    def stopping(self) -> bool:
        """True once `close` was called: work not started yet is skipped."""
        return self._stopping.is_set()

    def start(self, target: Callable[[], None], name: str) -> threading.Thread | None:
        """Starts `target` in a daemon thread owned by this object.

        Args:
          target: what the thread runs; it should return soon once `stopping` is True.
          name: the thread's name (shown by debuggers and `threading.enumerate`).

        Returns:
          The started thread, or None when the owner is closing (nothing was started).
        """
        with self._lock:
            if self._stopping.is_set():
                return None
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return thread

    def alive(self) -> list[threading.Thread]:
        """The threads still running."""
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def close(self) -> None:
        """Stops new work and joins every thread (see the class). Idempotent.

        Raises:
          KeyboardInterrupt: a signal handler raised it while the threads were joined (after
            they all ended).
        """
        self._stopping.set()
        interrupted: KeyboardInterrupt | None = None
        while alive := self.alive():
            try:
                for thread in alive:
                    thread.join()
            except KeyboardInterrupt as err:  # a compilation cannot be interrupted: wait on
                interrupted = interrupted or err
        with self._lock:
            self._threads.clear()
        if interrupted is not None:
            raise interrupted


# Every owner not yet garbage-collected: `atexit` joins their threads as a last resort.
_OWNERS: weakref.WeakSet[BackgroundThreads] = weakref.WeakSet()
_CURRENT: contextvars.ContextVar[BackgroundThreads | None] = contextvars.ContextVar(
    "esacl_background_threads", default=None)
_PROCESS = BackgroundThreads()  # threads started outside any run


@atexit.register
def _join_every_thread_at_exit() -> None:
    """Last resort (a caller that never closed its owner): runs before the interpreter
    finalizes, while the threads can still return into Python."""
    for owner in list(_OWNERS):
        with contextlib.suppress(KeyboardInterrupt):
            owner.close()


def current_owner() -> BackgroundThreads:
    """The owner of background threads started here.

    Returns:
      The owner of the run this code runs in (`owned_threads`), else the process-wide one.
    """
    return _CURRENT.get() or _PROCESS


@contextlib.contextmanager
def owned_threads() -> Iterator[BackgroundThreads]:
    """A new owner of background threads for the block (e.g. one run); on leaving the block,
    however it is left, the owner is closed: every thread started in it has ended.

    Returns:
      A context manager yielding the `BackgroundThreads` that `current_owner` returns inside
      the block (in the thread and context that entered it).
    """
    owner = BackgroundThreads()
    token = _CURRENT.set(owner)
    try:
        yield owner
    finally:
        try:
            owner.close()
        finally:
            _CURRENT.reset(token)


class BackgroundCompile:
    """Lowers and compiles ``jitted`` for the given argument specs in a thread of the current
    owner (`current_owner`).

    `wait()` before the first real call, so that call finds the program compiled instead of
    compiling it a second time concurrently. A failure is silent: the first call then compiles
    (and reports) it itself. Once the owner is closing, the thread skips the compilation it
    has not begun.
    """

    def __init__(self, jitted: Any, *args: Any, owner: BackgroundThreads | None = None):
        specs = jax.tree.map(arg_spec, args)
        owner = owner or current_owner()
        self._thread = owner.start(lambda: compile_unless_stopping(jitted, specs, owner),
                                   name="esacl-background-compile")

    def wait(self) -> None:
        """Blocks until the background compilation has ended (at once if none was started)."""
        if self._thread is not None:
            self._thread.join()


def compile_unless_stopping(jitted: Any, specs: Any, owner: BackgroundThreads) -> None:
    """Lowers ``jitted`` for `specs` and, unless `owner` is stopping by then, compiles it into
    JAX's cache; a failure is left to the first real call, which compiles and reports it.

    Args:
      jitted: a ``jax.jit`` function.
      specs: the tuple of its arguments' abstract values (``jax.ShapeDtypeStruct`` trees).
      owner: the owner of the calling thread.
    """
    try:
        lowered = jitted.lower(*specs)
        if not owner.stopping:
            lowered.compile()
    except Exception:  # noqa: BLE001 - the first real call compiles (and reports) it
        pass
