"""The `kvmsplit` command line: one module per command group, over shared
options (options) and terminal output (console)."""
from kvmsplit.cli.main import main

__all__ = ["main"]
