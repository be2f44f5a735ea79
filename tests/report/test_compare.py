"""compare: verdict changes between two runs, and phase-time regressions
judged against the spread of earlier runs, never against one sample."""
import pytest
from samples import make_run, phases

from kvmsplit.runs.compare import compare, mann_whitney_greater
from kvmsplit.runs.history import History

pytest_plugins = ["cli_fixture"]      # kv

DAY = 86400.0
# per-run wobble of every phase time: a few percent, as on a quiet host
JITTER = [1.00, 1.03, 0.98, 1.02, 0.99, 1.01]


def nightly(history: History, factors: list[float], host: str = "ci-box.example.org",
            kernel: str = "6.18.0-test", first_night: int = 0) -> list:
    """One run per night, thp/2m/bitmap's phases scaled by each factor."""
    runs = []
    for night, f in enumerate(factors, first_night):
        rr = make_run(run_id=f"night-{night}", started=1_767_225_600.0 + night * DAY, host=host)
        rr.host["kernel"]["release"] = kernel
        rr.scenarios[0].phases = phases(scale=f)
        history.add_run(rr)
        runs.append(rr)
    return runs


@pytest.fixture
def history(tmp_path):
    return History(tmp_path / "history.sqlite")


def test_a_clearly_slower_phase_is_flagged(history):
    *_, a, b = nightly(history, JITTER[:5] + [1.0])
    b.scenarios[0].phases[3].duration_s *= 3          # dirty-1: 0.15 s -> 0.45 s
    c = compare(a, b, history)
    assert [(p.scenario, p.phase) for p in c.regressions] == [("thp/2m/bitmap", "dirty-1")]
    p = c.regressions[0]
    assert len(p.baseline) == 5 and p.median == pytest.approx(0.15, rel=0.03)


def test_jitter_within_the_spread_is_not_flagged(history):
    *_, a, b = nightly(history, JITTER)
    assert [p for p in compare(a, b, history).phases if p.enough]
    assert compare(a, b, history).regressions == []


def test_repeats_of_a_new_kernel_are_judged_together(history):
    # (three repeats reach p < 0.01 only against seven or more baseline runs)
    *_, a = nightly(history, JITTER + [1.0, 0.98])
    # three runs of the patched kernel, each 30% slower: too little for one
    # run to stand out, but consistent over the repeats
    *_, b = nightly(history, [1.30, 1.33, 1.29], kernel="6.18.0-patched", first_night=8)
    c = compare(a, b, history)
    slow = {p.phase: p for p in c.regressions}
    assert "dirty-1" in slow and slow["dirty-1"].repeated and slow["dirty-1"].p_value < 0.01
    assert "median 0.195s over 3 runs vs 0.150s over 8 (Mann-Whitney p=0.0061)" in slow["dirty-1"].describe()


def test_repeats_with_jitter_only_are_not_flagged(history):
    *_, a = nightly(history, JITTER + [1.0, 0.98])
    *_, b = nightly(history, [1.01, 0.99, 1.02], kernel="6.18.0-patched", first_night=8)
    assert compare(a, b, history).regressions == []


def test_mann_whitney_exact():
    assert mann_whitney_greater([4, 5, 6], [1, 2, 3]) == pytest.approx(1 / 20)
    assert mann_whitney_greater([1, 2, 3], [4, 5, 6]) == 1.0
    assert mann_whitney_greater([5, 6, 7], [1, 2, 3, 4, 8]) == pytest.approx(7 / 56)


def test_a_noisy_baseline_absorbs_a_slow_night(history):
    # the same +40% that stands out above is within this host's usual swing
    *_, a, b = nightly(history, [1.0, 1.5, 0.8, 1.4, 0.7, 1.4])
    assert compare(a, b, history).regressions == []


def test_one_earlier_run_is_not_enough_to_judge(history):
    a, b = nightly(history, [1.0, 3.0])
    c = compare(a, b, history)
    assert c.regressions == [] and c.unjudged and all(len(p.baseline) == 1 for p in c.unjudged)


def test_other_hosts_and_other_parameters_are_not_a_baseline(history):
    nightly(history, JITTER[:4], host="other-box")
    a, b = nightly(history, [1.0, 3.0])
    assert compare(a, b, history).regressions == []
    b.scenarios[0].scenario["size"] = 1 << 30
    assert all(len(p.baseline) == 0 for p in compare(a, b, history).phases if p.scenario == "thp/2m/bitmap")


def test_new_failures_fixes_and_split_changes(history):
    a, b = nightly(history, [1.0, 1.0])
    a.scenarios[2].verdict = "PASS"                  # thp/2m/ring: PASS -> ERROR
    b.scenarios[1].verdict = "PASS"                  # thp/2m/manual: FAIL -> PASS
    b.scenarios[0].observed_split = "lazy"           # thp/2m/bitmap: eager -> lazy
    c = compare(a, b, history)
    assert [(s.name, was) for s, was in c.new_failures] == [("thp/2m/ring", "PASS")]
    assert [sb.name for _, sb in c.fixed] == ["thp/2m/manual"]
    assert [(sa.observed_split, sb.observed_split) for sa, sb in c.split_changes] == [("eager", "lazy")]
    assert c.worse


def test_compare_command(kv, tmp_path):
    db = tmp_path / "h.sqlite"
    rc, out, _ = kv("compare", "--db", db)
    assert rc == 0 and "fewer than two runs" in out
    a, b = nightly(History(db), [1.0, 1.0], host=__import__("socket").gethostname())
    b.scenarios[2].phases[0].duration_s = 5.0
    b.write(tmp_path / "b")
    rc, out, _ = kv("compare", "--db", db, "--exit-code")
    assert rc == 0 and "new failures (0)" in out and "not enough samples" in out
    a.scenarios[1].verdict = "PASS"
    a.write(tmp_path / "a")
    rc, out, _ = kv("compare", "--db", db, tmp_path / "a", tmp_path / "b" / "results.json", "--exit-code")
    assert rc == 1
    assert "FAIL  thp/2m/manual (was PASS): WARNING in kvm_mmu_split_huge_pages" in out
    assert f"kvmsplit rerun {tmp_path / 'b' / 'results.json'} --only thp/2m/manual" in out
