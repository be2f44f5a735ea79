"""The kernel's kvmmmu tracepoints as a second witness of huge-page splits.

A bottom layer: imports only kvmsplit.errors and the standard library.

    from kvmsplit.tracing import TraceSession, TracingUnavailable
    with TraceSession(tgid) as ts:      # a private trace instance, filtered to one process
        ...
        phase = ts.take()               # PhaseTrace: counts for what happened since the last take
"""
from .events import Event, GetPage, PhaseTrace, SetSpte, SplitHugePage, lost_in_text, parse, parse_trace
from .tracefs import (
    DEFAULT,
    EventSpec,
    RawTake,
    Tracefs,
    TraceSession,
    TracingUnavailable,
    find_tracefs,
    leftover_instances,
    probe,
)

__all__ = [
    "DEFAULT", "Event", "EventSpec", "GetPage", "PhaseTrace", "RawTake", "SetSpte", "SplitHugePage",
    "TraceSession", "Tracefs", "TracingUnavailable", "find_tracefs", "leftover_instances", "lost_in_text",
    "parse", "parse_trace", "probe",
]
