"""The kernel's tracepoints as the second witness of what the stats say.

One tracefs per run (found, or mounted once and unmounted at the end), and a
private trace instance per scenario, filtered to this process. Where tracing
cannot be had, the reason is kept and every scenario says its split evidence
is unconfirmed: never silently green.
"""
from __future__ import annotations

from kvmsplit.tracing import Tracefs, TraceSession, TracingUnavailable


class Witness:
    def __init__(self, fs: Tracefs | None, unavailable: str | None = None):
        self.fs, self.unavailable = fs, unavailable

    @classmethod
    def open(cls, enabled: bool = True) -> Witness:
        if not enabled:
            return cls(None, "tracepoints turned off (--no-trace)")
        try:
            return cls(Tracefs.open())
        except TracingUnavailable as e:
            return cls(None, e.reason)

    def session(self) -> TraceSession | None:
        """A private, opened trace instance for one scenario; None (and the
        reason in .unavailable) where tracing cannot be had."""
        if self.fs is None:
            return None
        try:
            return TraceSession(root=self.fs.root).open()
        except TracingUnavailable as e:
            self.unavailable = e.reason
            return None

    def close(self) -> None:
        if self.fs is not None:
            self.fs.close()
            self.fs = None
