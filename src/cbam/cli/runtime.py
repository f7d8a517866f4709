"""Process-wide runtime settings that only the command line may make: glibc's allocator.

glibc reads its ``MALLOC_*`` variables once, when a process starts, so the tuned setting (keep freed large
blocks instead of returning them to the system after every step; see the README, "The CPU allocator") can
only be had by starting the process again with them. ``cbam train``, ``demo`` and ``ablate`` do that
unless ``CBAM_MALLOC`` is set (``CBAM_MALLOC=default`` is the way out); ``cbam bench`` runs one child
process per setting instead. Library code never changes these settings: it is told what they are (the
bench's ``allocator`` argument). Threads are left to PyTorch (one per core; torchrun sets OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

from ..train.signals import Interrupted

# glibc: never return freed blocks below 100 GB to the system (mmap threshold and trim threshold)
TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "100000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
# subcommands whose CPU work runs with the tuned glibc allocator unless CBAM_MALLOC says otherwise
TUNED_MALLOC_COMMANDS = ("train", "demo", "ablate")


def allocator_setting(environ: Mapping[str, str] | None = None) -> str:
    """'tuned' when glibc keeps freed large blocks (our setting), 'custom' for other settings or a preloaded
    allocator, 'default' otherwise, as the process was started (``environ`` defaults to ``os.environ``)."""
    env = os.environ if environ is None else environ
    if all(env.get(k) == v for k, v in TUNED_ENV.items()):
        return "tuned"
    if any(k in env for k in TUNED_ENV) or "LD_PRELOAD" in env:
        return "custom"
    return "default"


def allocator_env(setting: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that must run with ``setting`` ('default' or 'tuned') and not
    re-tune itself."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in TUNED_ENV}
    if setting == "tuned":
        env.update(TUNED_ENV)
    env["CBAM_MALLOC"] = "as-is"
    return env


def reexec_with_tuned_malloc(argv: list[str]) -> None:
    """Restart this process as ``python -m cbam ARGV`` with the tuned allocator (does not return when it does).

    Skipped when CBAM_MALLOC is set, when the variables are already there, and off Linux.
    """
    already = os.environ.get("CBAM_MALLOC") or any(k in os.environ for k in TUNED_ENV)
    if already or not sys.platform.startswith("linux"):
        return
    env = {**os.environ, **TUNED_ENV, "CBAM_MALLOC": "tuned"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "cbam", *argv], env)


def stopped(command: str, exc: BaseException) -> int:
    """SIGINT / SIGTERM (see :mod:`cbam.train.signals`): one line on stderr; exit code 128 + the signal's number.

    Under torchrun only rank 0 says it (every worker stops the same way). A KeyboardInterrupt is a Ctrl-C that
    came before any work had started.
    """
    if not isinstance(exc, Interrupted):
        exc = Interrupted(signal.SIGINT)
    if os.environ.get("RANK", "0") == "0":
        print(f"cbam {command}: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code
