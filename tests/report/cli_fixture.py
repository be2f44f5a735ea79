"""The `kv` fixture: kvmsplit's command line in-process, against a private
data dir (so a private history database). Test modules load it with
`pytest_plugins = ["cli_fixture"]`: as a plugin it is imported by pytest
itself, which keeps its asserts rewritten and needs no conftest.py here
(see samples.py for why not)."""
import signal

import pytest


@pytest.fixture
def kv(tmp_path, monkeypatch, capsys):
    """kv("history", "--db", path) -> (exit code, stdout, stderr)."""
    from kvmsplit.cli.main import main
    monkeypatch.setenv("KVMSPLIT_DATA_DIR", str(tmp_path / "data"))
    sigterm = signal.getsignal(signal.SIGTERM)      # main() installs its own

    def run(*argv):
        try:
            rc = main([str(a) for a in argv])
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run
