"""Fail points for crash tests: ``VSEARCH_OPERATOR_FAILPOINTS=after-alias-switch`` makes the
operator SIGKILL itself right after the alias was switched and before the new status was
written (the worst moment for a switch), once per marker file. Off unless the variable is set."""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "VSEARCH_OPERATOR_FAILPOINTS"


def hit(name: str) -> None:
    armed = os.environ.get(ENV, "")
    if name not in {p.strip() for p in armed.split(",") if p.strip()}:
        return
    marker = os.environ.get(ENV + "_DIR")
    if marker:                                  # fire once: a marker file says it fired
        path = Path(marker) / f"{name}.fired"
        if path.exists():
            return
        path.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
