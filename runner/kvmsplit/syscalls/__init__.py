"""`kvmsplit trace`'s core: follow a process and its threads and children
with ptrace (python-ptrace), decode the KVM ioctls they make and sum them up
(memslot dirty-logging windows, GET/CLEAR/RESET/RUN counts, per-call times).

A bottom-layer package: imports only kvmsplit.errors, kvmsplit.vmm.kvm.uapi,
the standard library and python-ptrace.

    from kvmsplit.syscalls import Tracer
    result = Tracer(on_event=print).run(["python", "-m", "kvmsplit", "run", ...])
    result.exit_code, result.to_dict()["summary"]["memslots"]
"""
from .decode import (
    EVENTS_CAP,
    Call,
    Recorder,
    decode_args,
    describe,
    fd_kind,
    ioctl_name,
    is_kvm_request,
    logging_windows,
)
from .ptracer import Tracer, TraceResult

__all__ = ["EVENTS_CAP", "Call", "Recorder", "TraceResult", "Tracer", "decode_args", "describe", "fd_kind",
           "ioctl_name", "is_kvm_request", "logging_windows"]
