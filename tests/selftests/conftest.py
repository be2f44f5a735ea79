"""The KVM selftests, built once per session from Debian's linux-source
package (cached in the user's cache directory across sessions), and the real
outputs captured from them in data/."""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from conftest import need

DATA = Path(__file__).parent / "data"
CAPTURES = tomllib.loads((DATA / "captures.toml").read_text())


def capture(name: str) -> tuple[str, int]:
    """(output, exit status) of a capture in data/."""
    return (DATA / name).read_text(), CAPTURES[name]["exit"]


@pytest.fixture(scope="session")
def selftests_build():
    from kvmsplit.errors import NoInputError
    from kvmsplit.selftests.build import build, default_source
    need(shutil.which("gcc") is not None and shutil.which("make") is not None, "gcc and make are needed")
    try:
        source = default_source()
    except NoInputError:
        need(False, "Debian's kernel source is not installed (apt-get install linux-source-6.12)")
    return build(source)
