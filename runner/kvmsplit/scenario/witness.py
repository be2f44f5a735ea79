"""The kernel's tracepoints as the second witness of what the stats say.

One tracefs per run (found, or mounted once and unmounted at the end), and one
private trace instance per run, filtered to this process (its vCPU threads are
followed as they are made), drained at the start of every scenario. An
instance per scenario cost 0.1 s each (removing an instance frees its per-CPU
buffers), a tenth of a small scenario. Where tracing cannot be had, the reason
is kept and every scenario says its split evidence is unconfirmed: never
silently green.
"""
from __future__ import annotations

from kvmsplit.runs.sinks import warn
from kvmsplit.tracing import Tracefs, TraceSession, TracingUnavailable


class Witness:
    def __init__(self, fs: Tracefs | None, unavailable: str | None = None):
        self.fs, self.unavailable = fs, unavailable
        self._session: TraceSession | None = None

    @classmethod
    def open(cls, enabled: bool = True) -> Witness:
        if not enabled:
            return cls(None, "tracepoints turned off (--no-trace)")
        try:
            return cls(Tracefs.open())
        except TracingUnavailable as e:
            return cls(None, e.reason)

    def session(self) -> TraceSession | None:
        """The run's private, opened trace instance, emptied for a new scenario (what came
        between scenarios, the last VM's teardown, is no scenario's); None (and the reason
        in .unavailable) where tracing cannot be had."""
        if self.fs is None:
            return None
        if self._session is not None and not self._session.closed:
            self._session.take_raw()
            return self._session
        try:
            self._session = TraceSession(root=self.fs.root).open()
        except TracingUnavailable as e:
            self.unavailable = e.reason
            return None
        return self._session

    def close(self) -> None:
        """Remove the run's trace instance, then unmount what was mounted. A failure is said
        and does not hide how the run ended; the next run's recover_stale removes what is left."""
        session, self._session = self._session, None
        try:
            if session is not None:
                session.close()
        except TracingUnavailable as e:
            warn("trace instance not removed", e)
        finally:
            self._close_fs()

    def _close_fs(self) -> None:
        if self.fs is not None:
            self.fs.close()
            self.fs = None
