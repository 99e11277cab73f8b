"""Interrupts that Python would otherwise drop.

A signal handler that raises (KeyboardInterrupt, or a subclass carrying the signal) runs in the
main thread wherever it happens to be, and that can be inside a garbage-collection callback
(JAX registers one) or a ``__del__``. There Python prints the exception as "Exception ignored"
and carries on: the interrupt is lost and stderr holds a traceback. While `redelivered()` is
active, such an interrupt is not printed: its signal is sent to this process again 10 ms later
(from a thread: sent from the hook itself, the handler would run inside the hook), so the handler
raises once more, outside the callback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def redelivered() -> Iterator[None]:
    """While active, a KeyboardInterrupt that Python could not raise (an "unraisable" exception,
    `sys.unraisablehook`) re-sends its signal (its ``signum`` attribute, else SIGINT) to this
    process 10 ms later; any other unraisable exception goes to the hook installed before."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
            again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
