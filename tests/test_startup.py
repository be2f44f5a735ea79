"""What keeps start-up short (bench goal: process start to the guest's first line
<= 0.2 s) without changing what is loaded: only the named command's group is
imported, the guest's ELF is read without pyelftools, numpy comes when used."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from kvmsplit.errors import BadInputError
from kvmsplit.vmm.guest.build import guest_image
from kvmsplit.vmm.guest.loader import elf_load_segments

main = importlib.import_module("kvmsplit.cli.main")     # the package exports main() under that name


def command_group_modules() -> list[str]:
    """Every kvmsplit.cli module that defines commands (has add_parsers)."""
    cli = Path(main.__file__).parent
    return sorted(p.stem for p in cli.glob("*.py") if "\ndef add_parsers(" in p.read_text())


def test_the_command_table_names_every_command_of_every_group_and_nothing_else():
    assert sorted(set(main.COMMANDS.values())) == command_group_modules()
    defined = {}
    for group in command_group_modules():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"kvmsplit.cli.{group}").add_parsers(sub)
        defined.update({name: group for name in sub.choices})
    assert defined == main.COMMANDS


def test_a_command_loads_its_own_group_only():
    code = ("import sys; from kvmsplit.cli.main import build_parser; build_parser(['probe']); "
            "print(sorted(m for m in sys.modules if m.startswith('kvmsplit.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "kvmsplit.cli.host" in out and "kvmsplit.cli.remote" not in out and "kvmsplit.cli.series" not in out


@pytest.mark.parametrize("argv", [[], ["--help"], ["no-such-command"]])
def test_help_and_typos_see_every_command(argv):
    assert main.command_groups(argv) == list(dict.fromkeys(main.COMMANDS.values()))


def test_the_vmm_starts_without_numpy_or_pyelftools():
    code = ("import sys; import kvmsplit.vmm.machine, kvmsplit.scenario.engine; "
            "print([m for m in ('numpy', 'elftools', 'jsonschema', 'paramiko') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _reference(path: Path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        segs = [(s["p_paddr"], s["p_offset"], s["p_filesz"], s["p_memsz"])
                for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        return elf.header["e_entry"], segs


@pytest.mark.parametrize("which", ["guest (ELF32)", "python (ELF64)"])
def test_the_loaders_elf_reading_matches_pyelftools(which):
    path = Path(guest_image() if which.startswith("guest") else sys.executable).resolve()
    assert elf_load_segments(path.read_bytes(), path) == _reference(path)


@pytest.mark.parametrize("cut, words", [(4, "not a little-endian ELF"), (40, "truncated"), (None, "beyond the end")])
def test_a_broken_elf_is_bad_input(cut, words):
    data = Path(guest_image()).read_bytes()
    broken = data[:cut] if cut else data[:len(data) // 2]
    with pytest.raises(BadInputError, match=words):
        elf_load_segments(broken, "guest.elf")
