"""The one way SIGINT (Ctrl-C) and SIGTERM are handled by ``cbam train``, ``demo``, ``ablate`` and the launcher.

A signal never interrupts work half-way: :class:`StopFlag` only records it, and the code that owns the work
acts on it at a safe point. The training loop checks after each optimizer step (every rank agrees through
one all-reduce), saves, and raises :class:`Interrupted`; ``demo`` and ``ablate`` also check between two runs;
the multi-process launcher (:func:`run_forwarding`) passes the signal on to torchrun, which passes it to
every worker, and waits for them all. The command line turns :class:`Interrupted` into one line on stderr
and exit code 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process
killed by that signal.

StopFlags nest: the innermost sees a signal that arrived while only an outer one was active (a signal during
``demo``'s set-up of its next run is acted on by that run's loop), and the handlers in place before the
outermost one are restored when it leaves.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Work stopped by SIGINT / SIGTERM at a safe point; ``exit_code`` is 128 + the signal's number.

    ``checkpoint`` is where the interrupted training saved (None when nothing was saved, or not in this
    process); ``advice`` replaces the default "continue with --resume" (``demo`` and ``ablate`` continue
    when run again instead).
    """

    def __init__(self, signum: int, checkpoint: Path | None = None, advice: str | None = None) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.checkpoint = checkpoint
        if advice is None:
            advice = f"saved {checkpoint}, continue with --resume" if checkpoint else ""
        super().__init__(f"stopped by {signal_name(self.signum)}" + (f"; {advice}" if advice else ""))


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _State:
    """What every active StopFlag shares: the signal received (0: none), the nesting depth, the old handlers."""

    signum = 0
    depth = 0
    previous: dict[int, Any] = {}
    listeners: list[Callable[[int], None]] = []


def _handle(signum: int, frame: Any) -> None:
    _State.signum = signum
    for listener in list(_State.listeners):
        listener(signum)


class StopFlag:
    """SIGINT / SIGTERM handlers that only record the signal (``signum``, 0 while none came).

    Outside the main thread (where Python cannot install handlers) signals stay with whoever handles them.
    """

    def __enter__(self) -> StopFlag:
        if _State.depth == 0:
            _State.signum = 0
            _State.previous = {}
            for sig in SIGNALS:
                try:
                    _State.previous[sig] = signal.signal(sig, _handle)
                except ValueError:  # not the main thread: signals stay with the caller
                    pass
        _State.depth += 1
        return self

    @property
    def signum(self) -> int:
        return _State.signum

    def __exit__(self, *exc: object) -> None:
        _State.depth -= 1
        if _State.depth == 0:
            for sig, handler in _State.previous.items():
                signal.signal(sig, handler)
            _State.previous = {}
            _State.signum = 0


def run_forwarding(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in its own process group, pass SIGINT / SIGTERM on to that group, and wait for it.

    The child is in a session of its own, so a Ctrl-C in the terminal reaches it only through this function,
    once (torchrun, the child here, passes it on to its workers and waits for them). Returns the child's exit
    code, or 128 + the signal's number when a signal came (the child has then exited too).
    """
    forwarded: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int) -> None:
        if child and child[0].poll() is None:
            try:
                os.killpg(child[0].pid, signum)
            except ProcessLookupError:  # it has just exited
                pass
            forwarded.append(signum)

    with StopFlag() as stop:
        _State.listeners.append(forward)
        try:
            child.append(subprocess.Popen(list(cmd), env=env, start_new_session=True))
            if stop.signum and not forwarded:  # a signal that came while the child was being started
                forward(stop.signum)
            code = child[0].wait()
        finally:
            _State.listeners.remove(forward)
            if child and child[0].poll() is None:  # an exception here (not a signal): leave nothing behind
                os.killpg(child[0].pid, signal.SIGTERM)
                child[0].wait()
        return 128 + stop.signum if stop.signum else code
