"""results.json and the report files are rewritten as a run goes; what makes
that cheap must not change what they say."""
import json

from samples import make_run

from kvmsplit.report.outputs import FileSink
from kvmsplit.runs.results import RunResult, ScenarioResult, json_default


def reference(rr: RunResult) -> str:
    return json.dumps(rr.to_dict(), indent=1, default=json_default)


def test_results_json_from_cached_scenarios_is_the_plain_encoding():
    rr = make_run()
    assert rr.json_text() == reference(rr)
    for i in range(len(rr.scenarios)):
        rr.done(i)
    assert rr.json_text() == reference(rr)
    assert json.loads(rr.json_text()) == json.loads(reference(rr))


def test_a_scenario_replaced_after_it_was_done_is_encoded_again():
    rr = make_run()
    rr.done(0)
    first = rr.scenarios[0]
    rr.scenarios[0] = ScenarioResult(name=first.name, scenario=first.scenario, verdict="ERROR",
                                     reasons=["interrupted"])
    assert rr.json_text() == reference(rr)
    assert json.loads(rr.json_text())["scenarios"][0]["reasons"] == ["interrupted"]


def test_an_empty_run_and_awkward_values_encode_like_json_dumps():
    rr = make_run()
    rr.scenarios = []
    rr.argv = ["kvmsplit", "run", "-k", 'a "quoted"\nline', "scenarios"]
    assert rr.json_text() == reference(rr)


def test_written_results_json_reads_back(tmp_path):
    rr = make_run()
    rr.done(1)
    path = rr.write(tmp_path)
    assert RunResult.from_dict(json.loads(path.read_text())).to_dict() == rr.to_dict()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_report_files_are_rewritten_after_a_scenario_unless_that_would_cost_over_a_tenth_of_the_run(tmp_path):
    clock = Clock()
    sink, rr = FileSink(clock), make_run()
    sink.cost, sink.last = 1.0, 100.0       # a write that took 1 s, ending now
    clock.t = 105.0
    sink.scenario_done(rr, 0, tmp_path)
    assert not (tmp_path / "junit.xml").exists()    # 5 s after a 1 s write: not yet
    clock.t = 110.0
    sink.scenario_done(rr, 0, tmp_path)
    assert (tmp_path / "junit.xml").exists()


def test_the_end_of_a_run_always_writes_the_report_files(tmp_path):
    clock = Clock()
    sink, rr = FileSink(clock), make_run()
    sink.cost, sink.last = 1000.0, 100.0
    sink.finished(rr, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"junit.xml", "results.ktap", "kcidb.json"}
