"""SIGINT/SIGTERM from an entry point's first line, before its seconds of imports (jax).

Standard library only, so that importing it is instant. An entry point installs the handlers
first thing (`install_if_main(__name__)`); a signal is then recorded instead of raising
KeyboardInterrupt wherever an import happens to be (a traceback) or killing the process
silently, and the entry point stops cleanly at its first check (`exit_if_signalled`) with one
line and the shell's status, 130 or 143. A second signal before the entry point's `main` runs
ends the process at once with that line (nothing was written yet); in `main`, it raises
KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class EarlySignals:
    """The handler of SIGINT and SIGTERM until the program's own takes over (see module)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_main = False

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            return
        if self.in_main:
            raise KeyboardInterrupt
        print(line(signum), file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def install(self) -> EarlySignals:
        """Installs the handlers (a signal ignored by the parent, as under nohup, stays so)."""
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)
        return self

    def exit_if_signalled(self) -> None:
        """Marks `main` as running; exits 130/143 with one line when a signal came before."""
        self.in_main = True
        if self.signum is not None:
            print(line(self.signum), file=sys.stderr, flush=True)
            sys.exit(128 + self.signum)


def line(signum: int) -> str:
    """The one line for a signal that came before the run started."""
    return (f"interrupted by {signal.Signals(signum).name} before the run started: nothing "
            "was written")


def install_if_main(module_name: str) -> EarlySignals | None:
    """`EarlySignals().install()` when `module_name` is "__main__" (a program, not an import).

    In "__mp_main__" (a "spawn" worker process's copy of the program: a sweep's worker) SIGINT
    is ignored instead: a terminal's Ctrl-C reaches the whole process group, and the worker's
    parent handles it (it stops its workers with SIGTERM); a run inside the worker still stops
    at its next chunk on either signal (`esacl_jax.harness.loop`). Returns None then, and for
    a plain import.
    """
    if module_name == "__mp_main__":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return EarlySignals().install() if module_name == "__main__" else None
