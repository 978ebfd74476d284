"""Crash injection for the crash-recovery tests. INERT unless EDGESHIP_CRASH_AT is set.

EDGESHIP_CRASH_AT names one point, e.g. `state:smoke_testing` (right after that state is
persisted), `download:50%` (once half the archive is on disk), `switch:after_rename`; when the
running code reaches it, the process SIGKILLs itself: no cleanup, no atexit, like a power cut.
Production never sets the variable; nothing here runs otherwise.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGESHIP_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if EDGESHIP_CRASH_AT == name."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_at_fraction(kind: str, done: int, total: int | None) -> None:
    """SIGKILL when EDGESHIP_CRASH_AT == f'{kind}:N%' and done/total >= N%."""
    want = os.environ.get(ENV, "")
    if not want.startswith(kind + ":") or not want.endswith("%") or not total:
        return
    try:
        pct = float(want[len(kind) + 1:-1])
    except ValueError:
        return
    if done * 100 >= pct * total:
        os.kill(os.getpid(), signal.SIGKILL)
