"""Scenario files: every mistake is one clear line naming the file, the
scenario and the key, with its own exit code. Table-driven."""
import textwrap

import pytest

from kvmsplit.cli.main import main
from kvmsplit.errors import EXIT_BAD_INPUT, EXIT_NO_INPUT, BadInputError
from kvmsplit.scenario.model import DirtyMode, load_file, parse_size

GOOD = """
[defaults]
size = "64M"
backing = "hugetlb-2m"

[[scenario]]
name = "a"
dirty_mode = "ring-acq-rel"
ring_size = "16K"

[[scenario]]
name = "b"
backing = "thp"
vcpus = 2
memslots = 2
pattern = "random"
percent = 25
seed = 42
passes = 3
expect = "lazy"
"""


def write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_file_round_trips(tmp_path):
    a, b = load_file(write(tmp_path, GOOD))
    assert a.size == 64 << 20 and a.dirty_mode is DirtyMode.RING_ACQ_REL and a.ring_size == 16384
    assert (b.vcpus, b.memslots, b.percent, b.seed, b.expect) == (2, 2, 25, 42, "lazy")
    # what results.json stores is enough to rebuild the same scenario
    assert type(b).from_dict(b.to_dict()) == b


BAD = [
    ('name = "x"\nsize = "64M"\nsizee = 1', "unknown key 'sizee' (did you mean 'size'?)"),
    ('name = "x"\nbacking = "thp2"', "backing: unknown value 'thp2'"),
    ('name = "x"\ndirty_mode = "rings"', "dirty_mode: unknown value 'rings'"),
    ('name = "x"\nguest_page = "2g"', "guest_page: unknown value '2g'"),
    ('name = "x"\nsize = "lots"', "size: expected a size like 256M"),
    ('name = "x"\nsize = "3M"', "does not split into 1 memslot(s) of whole 2M pages"),
    ('name = "x"\nsize = "64M"\nbacking = "hugetlb-1g"', "of whole 1G pages"),
    ('name = "x"\nsize = "1T"', "size: must be between 4K and 512G"),
    ('name = "x"\npercent = 120', "percent: must be 1..100"),
    ('name = "x"\nvcpus = 0', "vcpus: must be 1..64"),
    ('name = "x"\nvcpus = "two"', "vcpus: expected an integer"),
    ('name = "x"\nring_size = "5000"', "ring_size: must be a power of two"),
    ('size = "64M"', "missing 'name'"),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_scenario_is_one_clear_line(tmp_path, body, message):
    p = write(tmp_path, "[[scenario]]\n" + body + "\n")
    with pytest.raises(BadInputError) as e:
        load_file(p)
    assert message in str(e.value)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(BadInputError, match="not valid TOML"):
        load_file(write(tmp_path, "[[scenario]\n"))
    with pytest.raises(BadInputError, match="no \\[\\[scenario\\]\\] tables"):
        load_file(write(tmp_path, "[defaults]\nsize = 1\n"))
    with pytest.raises(BadInputError, match="unknown top-level key 'scenarios'"):
        load_file(write(tmp_path, "[[scenarios]]\nname='x'\n"))
    with pytest.raises(BadInputError, match="duplicate name 'x'"):
        load_file(write(tmp_path, "[[scenario]]\nname='x'\n[[scenario]]\nname='x'\n"))


def test_cli_exit_codes_and_no_traceback(tmp_path, capsys):
    p = write(tmp_path, "[[scenario]]\nname='x'\nbogus=1\n")
    assert main(["list", "--scenario", str(p)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("kvmsplit: error: ") and "Traceback" not in err and err.count("\n") == 1
    assert main(["run", "--scenario", str(tmp_path / "nope.toml")]) == EXIT_NO_INPUT


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30),
                                        ("2GiB", 2 << 30), ("16k", 16384), (123, 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value
