"""One results model: what is written validates against the schema and
loads back equal; what does not fit is refused with one line."""
import json

import pytest
from samples import DATA, make_run

from kvmsplit.errors import EXIT_BAD_INPUT, EXIT_NO_INPUT, BadInputError, NoInputError
from kvmsplit.runs.results import RunResult
from kvmsplit.runs.schema import load_results, validate

pytest_plugins = ["cli_fixture"]      # kv


def roundtrip(rr: RunResult) -> RunResult:
    data = json.loads(json.dumps(rr.to_dict()))
    validate(data)
    return RunResult.from_dict(data)


def test_every_verdict_survives_a_round_trip():
    rr = make_run()
    assert {s.verdict for s in rr.scenarios} == {"PASS", "FAIL", "ERROR", "SKIP", "MISS"}
    back = roundtrip(rr)
    assert back == rr
    assert back.series["version"] == 3
    assert back.scenarios[1].kernel_log["reports"][0]["title"] == "WARNING in kvm_mmu_split_huge_pages"
    assert back.scenarios[0].phases[2].vm_stats["pages_4k"] == 65544


def test_a_real_run_validates_and_round_trips(tmp_path):
    real_run = load_results(DATA / "results.json")
    assert real_run.scenarios and all(s.phases or s.verdict == "SKIP" for s in real_run.scenarios)
    assert roundtrip(real_run) == real_run
    real_run.write(tmp_path)
    assert load_results(tmp_path) == real_run


def test_results_without_series_or_kind_are_valid():
    rr = make_run()
    rr.series = None
    assert roundtrip(rr).series is None


def test_a_malformed_result_names_the_place(tmp_path):
    d = make_run().to_dict()
    d["scenarios"][1]["verdict"] = "MAYBE"
    (tmp_path / "results.json").write_text(json.dumps(d))
    with pytest.raises(BadInputError, match=r"at scenarios/1/verdict: 'MAYBE' is not one of"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"host": ')
    with pytest.raises(BadInputError, match=r"results.json:1: not valid JSON"):
        load_results(tmp_path / "results.json")
    with pytest.raises(NoInputError, match="no such results file"):
        load_results(tmp_path / "nope.json")


def test_report_command_exit_codes(kv, tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert kv("report", tmp_path / "bad.json", "-o", tmp_path / "r.html")[0] == EXIT_BAD_INPUT
    assert kv("report", tmp_path / "missing.json", "-o", tmp_path / "r.html")[0] == EXIT_NO_INPUT
