"""What the kernel logged while kvmsplit worked: reports, lost records and taint.

    from kvmsplit.kernellog import KernelLogGuard
    with KernelLogGuard() as g:
        ...                      # the unit of work
    g.result.status              # "clean", "reports" or "unchecked"
"""
from kvmsplit.kernellog.guard import GuardResult, KernelLogGuard
from kvmsplit.kernellog.records import KernelLogFormatError, Record, parse_log_text
from kvmsplit.kernellog.reports import REPORT_TYPES, Report, ReportType, corrupted_note, parse_reports
from kvmsplit.kernellog.taint import decode_taint, describe_taint, read_taint

__all__ = ["KernelLogGuard", "GuardResult", "Report", "ReportType", "REPORT_TYPES", "Record",
           "parse_reports", "corrupted_note", "parse_log_text", "KernelLogFormatError", "read_taint", "decode_taint",
           "describe_taint"]
