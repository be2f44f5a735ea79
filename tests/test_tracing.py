"""kvmsplit.tracing: the kvmmmu tracepoints as a second witness of huge-page splits.

The parser is tested on sample text, including two real captures
(tests/tracing_data/: one `kvmsplit run` of a 32M THP scenario with 2M guest
pages on a shadow-paging host, read in both output formats at once). The
sessions are tested for real: private trace instances around a real
`kvmsplit run` subprocess, failures that really happen (no such root, no root,
no CAP_SYS_ADMIN), interrupts, and that nothing is left behind.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import need
from kvmsplit.tracing import (
    GetPage,
    PhaseTrace,
    SetSpte,
    SplitHugePage,
    TraceSession,
    TracingUnavailable,
    find_tracefs,
    leftover_instances,
    lost_in_text,
    parse,
    parse_trace,
    probe,
)
from kvmsplit.tracing.tracefs import EventSpec, Tracefs, pid_namespace

DATA = Path(__file__).parent / "tracing_data"
REPO = Path(__file__).resolve().parents[1]
SAMPLE_TGID = 20872

H = "          python-20876   (  20872) [001] ...1.  1328.716953: "      # a line's prefix, this process


# -- the parser, on sample text ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fields", "text"])
def test_a_real_capture_parses_whole(fmt):
    text = (DATA / f"thp32m_tgid{SAMPLE_TGID}_{fmt}.txt").read_text()
    p = parse(text, SAMPLE_TGID)
    assert (p.unparsed, p.foreign, p.other, p.unattributed, p.lost) == (0, 0, 0, 0, 0)
    pt = PhaseTrace.from_text(text, SAMPLE_TGID)
    # 16 2M regions of guest RAM: each mapped huge at populate, mapped at 4K on the first write
    # (a new direct l1 shadow page), mapped huge again; plus gfn 0 (low memory) at 4K.
    assert pt.splits_by_level == {}
    assert pt.new_direct_l1 == pt.new_direct_l1_gfns == 17
    assert pt.regions_dismantled == 17
    assert pt.huge_mapped_by_level == {2: 32}
    assert pt.events == 57
    assert pt.new_direct_l1_guest_mode == (0 if fmt == "fields" else None)
    gp = [e for e in parse_trace(text, SAMPLE_TGID) if isinstance(e, GetPage)]
    assert GetPage(0x100000, 1, True, True, False if fmt == "fields" else None) in gp
    assert SetSpte(0x101e00, 2) in parse_trace(text, SAMPLE_TGID)


def test_both_formats_give_the_same_events_but_guest_mode():
    f = parse_trace((DATA / f"thp32m_tgid{SAMPLE_TGID}_fields.txt").read_text(), SAMPLE_TGID)
    t = parse_trace((DATA / f"thp32m_tgid{SAMPLE_TGID}_text.txt").read_text(), SAMPLE_TGID)
    strip = [GetPage(e.gfn, e.level, e.direct, e.created) if isinstance(e, GetPage) else e for e in f]
    assert strip == t


def test_other_processes_lines_are_counted_not_parsed():
    text = (DATA / f"thp32m_tgid{SAMPLE_TGID}_fields.txt").read_text()
    assert parse_trace(text, SAMPLE_TGID + 1) == []
    assert parse(text, 4).foreign == 57
    assert parse(text.replace("(  20872)", "(-------)"), SAMPLE_TGID).unattributed == 57


def test_splits_in_both_formats_with_errno():
    text = "\n".join([
        H + "kvm_mmu_split_huge_page: gfn 100000 spte 8000000185e00ee7 level 2 errno 0",
        H + "kvm_mmu_split_huge_page: gfn 100200 spte 20a400ee7 level 2 errno -12",
        H + "kvm_mmu_split_huge_page: gfn=0x140000 (1310720) spte=0x8000000185e00ee7 (-9223372030313754905) "
            "level=0x3 (3) errno=0xfffffff4 (-12)",
        H + "kvm_mmu_split_huge_page: gfn=0x100400 (1049600) spte=0x20b800ee7 (8782876391) "
            "level=0x2 (2) errno=0x0 (0)",
    ])
    assert parse_trace(text, SAMPLE_TGID) == [
        SplitHugePage(0x100000, 2, 0), SplitHugePage(0x100200, 2, -12),
        SplitHugePage(0x140000, 3, -12), SplitHugePage(0x100400, 2, 0)]
    pt = PhaseTrace.from_text(text, SAMPLE_TGID)
    assert pt.splits_by_level == {2: 2}         # what was split; a failed split leaves its huge page
    assert pt.splits == 2
    assert pt.split_errnos == ((0x100200, -12), (0x140000, -12))
    assert pt.split_errors == 2
    assert pt.split_gfns == 2
    assert pt.regions_dismantled == 2


def test_eagain_is_a_retry_not_a_failure():
    """Seen in `kvmsplit vm`: the shadow MMU's nested split drops mmu_lock to top up its caches,
    traces -EAGAIN for the huge page, restarts, and then splits the same page."""
    text = "\n".join([
        H + "kvm_mmu_split_huge_page: gfn 100000 spte 8000000185e00ee7 level 2 errno -11",
        H + "kvm_mmu_get_page: sp gen 0 gfn 100000 l1 8-byte q0 direct wux nxe ad root 0 sync new",
        H + "kvm_mmu_split_huge_page: gfn 100000 spte 8000000185e00ee7 level 2 errno 0",
    ])
    pt = PhaseTrace.from_text(text, SAMPLE_TGID)
    assert (pt.splits_by_level, pt.split_retries, pt.split_errors, pt.split_errnos) == ({2: 1}, 1, 0, ())
    assert pt.regions_dismantled == 1


def test_a_shadow_mmu_eager_split_counts_one_region():
    """An L2's huge page split by the shadow MMU: a new direct l1 page, then the split, one gfn."""
    text = "\n".join([
        H + "kvm_mmu_get_page: sp gen 0 gfn 40000 l1 8-byte q0 direct wux nxe ad root 0 sync new",
        H + "kvm_mmu_split_huge_page: gfn 40000 spte 6000ee7 level 2 errno 0",
        H + "kvm_mmu_get_page: sp gen 0 gfn 40200 l1 8-byte q0 direct wux nxe ad root 0 sync new",
        H + "kvm_mmu_split_huge_page: gfn 40200 spte 6200ee7 level 2 errno 0",
        # a 1G split at the same base gfn as the first 2M region is another region
        H + "kvm_mmu_split_huge_page: gfn 40000 spte 40000ee7 level 3 errno 0",
        # not counted: existing pages, indirect pages, direct pages above level 1
        H + "kvm_mmu_get_page: sp gen 0 gfn 40400 l1 8-byte q0 direct wux nxe ad root 0 sync existing",
        H + "kvm_mmu_get_page: sp gen 0 gfn 103 l3 8-byte q0 wux nxe ad root 0 sync new",
        H + "kvm_mmu_get_page: sp gen 0 gfn 0 l2 8-byte q0 direct wux nxe ad root 0 sync new",
    ])
    pt = PhaseTrace.from_text(text, SAMPLE_TGID)
    assert pt.new_direct_l1 == 2
    assert pt.splits_by_level == {2: 2, 3: 1}
    assert pt.split_gfns == 2
    assert pt.regions_dismantled == 3
    assert pt.new_direct_l1_guest_mode is None


def test_guest_mode_comes_from_the_role_word():
    line = (H + "kvm_mmu_get_page: mmu_valid_gen=(0) gfn=0x40000 (262144) role=0x{:x} (0) "
            "root_count=0x0 (0) unsync=(0) created=(1)")
    evs = parse_trace("\n".join([line.format(0x23781), line.format(0x3781), line.format(0x23782)]), SAMPLE_TGID)
    assert evs == [GetPage(0x40000, 1, True, True, True), GetPage(0x40000, 1, True, True, False),
                   GetPage(0x40000, 2, True, True, True)]
    assert PhaseTrace.from_events(evs).new_direct_l1_guest_mode == 1


def test_one_byte_fields_that_print_as_characters():
    # `fields` prints a printable byte as 'c' before its value: level 0x41 would read 'A'(65)
    line = H + "kvm_mmu_set_spte: gfn=0x100000 (1048576) spte=0x1 (1) sptep=0x2 (2) level='A'(65) r=(1) x=(1) u=(1)"
    assert parse_trace(line, SAMPLE_TGID) == [SetSpte(0x100000, 65)]


def test_garbage_odd_names_and_other_events():
    text = "\n".join([
        "# tracer: nop",
        "",
        "complete garbage",
        "           <...>-77 [000] .... 12.5: kvm_mmu_set_spte: gfn 1 spte 2 (rwxu) level 2 at 3",   # no TGID
        "       CPU 0/KVM-4242    (  20872) [003] d..1.  17.000001: kvm_mmu_set_spte: "
        "gfn 200 spte 20a400ee7 (rwxu) level 2 at 120119008",                    # comm with space, slash
        "    kvm-nx-lpage-re-4243    (  20872) [000] .....  17.5: kvm_mmu_prepare_zap_page: sp gen 0 gfn 0",
        H + "kvm_mmu_split_huge_page: gfn zz spte 1 level 2 errno 0",          # body that does not parse
        H + "kvm_mmu_get_page: role=0x3781 (14209)",                              # fields missing
        "          python-99 [001] 1328.716953: kvm_mmu_set_spte: gfn 1 spte 2 (rwxu) level 2 at 3",
        "          python-20876   (  20872) [001]  1328.9: kvm_mmu_set_spte: gfn 400 spte 2 (rwx) level 3 at 3",
    ])
    p = parse(text, SAMPLE_TGID)
    assert p.events == [SetSpte(0x200, 2), SetSpte(0x400, 3)]      # the last: no flags column
    assert p.other == 1
    assert p.unparsed == 5
    pt = PhaseTrace.from_text(text, SAMPLE_TGID)
    assert pt.huge_mapped_by_level == {2: 1, 3: 1}
    assert pt.unparsed == 5


def test_lost_events_in_the_text():
    text = "\n".join([
        "# tracer: nop",
        "#",
        "# entries-in-buffer/entries-written: 57/100   #P:2",
        "#",
        "CPU:1 [LOST 12 EVENTS]",
        H + "kvm_mmu_set_spte: gfn 200 spte 20a400ee7 (rwxu) level 2 at 120119008",
    ])
    assert lost_in_text(text) == 43 + 12
    assert PhaseTrace.from_text(text, SAMPLE_TGID).lost == 55
    assert PhaseTrace.from_text(text, SAMPLE_TGID, lost=80).lost == 80       # per-CPU stats said more
    assert lost_in_text("# entries-in-buffer/entries-written: 57/57   #P:2") == 0


def test_split_errnos_are_capped_but_counted():
    evs = [SplitHugePage(0x200 * i, 2, -12) for i in range(100)]
    pt = PhaseTrace.from_events(evs)
    assert len(pt.split_errnos) == 16
    assert pt.split_errors == 100


def test_to_dict_is_small_json_and_round_trips():
    text = (DATA / f"thp32m_tgid{SAMPLE_TGID}_fields.txt").read_text()
    text += "\n" + H + "kvm_mmu_split_huge_page: gfn 100200 spte 20a400ee7 level 2 errno -5"
    pt = PhaseTrace.from_text(text, SAMPLE_TGID, lost=3)
    d = json.loads(json.dumps(pt.to_dict()))
    assert PhaseTrace.from_dict(d) == pt
    assert d["huge_mapped_by_level"] == {"2": 32}
    assert d["split_errnos"] == [[0x100200, -5]]
    assert len(json.dumps(d)) < 600
    assert PhaseTrace.from_dict({}) == PhaseTrace()


def test_find_tracefs_prefers_the_usual_place_and_unescapes():
    mounts = ("proc /proc proc rw 0 0\n"
              "nodev /tmp/my\\040trace tracefs rw,relatime 0 0\n"
              "debugfs /sys/kernel/debug debugfs rw 0 0\n")
    assert find_tracefs(mounts) == "/tmp/my trace"
    assert find_tracefs(mounts + "tracefs /sys/kernel/tracing tracefs rw 0 0\n") == "/sys/kernel/tracing"
    assert find_tracefs("proc /proc proc rw 0 0\n") is None


# -- failures that really happen -----------------------------------------------------------------

def test_a_root_that_does_not_exist(tmp_path):
    with pytest.raises(TracingUnavailable, match="no such directory") as e:
        TraceSession(root=tmp_path / "nope").open()
    assert "\n" not in e.value.reason
    assert e.value.exit_code == 69
    out = probe(root=tmp_path / "nope")
    assert out == {"available": False, "reason": f"{tmp_path / 'nope'}: no such directory",
                   "mounted": None, "events": []}


def test_a_root_that_is_not_tracefs_or_has_no_kvm_events(tmp_path):
    with pytest.raises(TracingUnavailable, match="not a tracefs"):
        TraceSession(root=tmp_path).open()
    (tmp_path / "instances").mkdir()
    (tmp_path / "events" / "sched").mkdir(parents=True)
    with pytest.raises(TracingUnavailable, match="no kvmmmu trace events"):
        TraceSession(root=tmp_path).open()
    assert probe(root=tmp_path)["reason"].startswith("no kvmmmu trace events")
    assert os.listdir(tmp_path / "instances") == []


SNIPPET = """
import sys
sys.path.insert(0, {runner!r})
from kvmsplit.tracing import TraceSession, TracingUnavailable
for private in (False, True):
    try:
        TraceSession(private_mount=private).open().close()
        print("opened")
    except TracingUnavailable as e:
        print("unavailable:", e.reason)
"""


def _as(prefix):
    """Run SNIPPET under `prefix` (another user, fewer capabilities). The package is copied to a
    directory anyone may read: a checkout can sit under a 0700 directory (`mktemp -d`)."""
    runner = Path(tempfile.mkdtemp(prefix="kvmsplit-test-runner-"))
    try:
        os.chmod(runner, 0o755)
        shutil.copytree(REPO / "runner" / "kvmsplit", runner / "kvmsplit",
                        ignore=shutil.ignore_patterns("__pycache__"))
        r = subprocess.run([*prefix, sys.executable, "-c", SNIPPET.format(runner=str(runner))],
                           capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        shutil.rmtree(runner, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _tracefs_in_kernel():
    return "tracefs" in Path("/proc/filesystems").read_text().split()


def test_not_root_cannot_trace():
    """As nobody: the mounted tracefs is closed to it, and it may not mount its own."""
    need(_tracefs_in_kernel(), "no tracefs in this kernel")
    if os.geteuid() == 0:
        need(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
        prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    else:
        prefix = []
    before = Path("/proc/mounts").read_text()
    found, private = _as(prefix)
    if find_tracefs(before):
        assert re.fullmatch(r"unavailable: .*: Permission denied \(tracing needs root\)", found), found
    assert re.fullmatch(r"unavailable: cannot mount tracefs at \S+: Operation not permitted "
                        r"\(tracing needs root\)", private), private
    assert Path("/proc/mounts").read_text() == before
    tmp = Path(tempfile.gettempdir())               # the failed mount's directory is gone again
    assert not [d for d in tmp.glob("kvmsplit-tracefs-*") if d.stat().st_uid == 65534]


@pytest.mark.kvm
def test_root_without_cap_sys_admin_cannot_mount():
    """Root without CAP_SYS_ADMIN: may not mount, but may use a mounted tracefs (file modes)."""
    need(os.geteuid() == 0, "needs root")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    need(probe()["available"], "kernel tracing unavailable: " + str(probe()["reason"]))
    before = Path("/proc/mounts").read_text()
    found, private = _as(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"])
    if find_tracefs(before):
        assert found == "opened"
    else:       # the same refusal (in a temp directory of its own)
        assert re.sub(r"kvmsplit-tracefs-\S+", "D", found) == re.sub(r"kvmsplit-tracefs-\S+", "D", private)
    assert re.fullmatch(r"unavailable: cannot mount tracefs at \S+: Operation not permitted "
                        r"\(tracing needs root\)", private), private
    assert Path("/proc/mounts").read_text() == before


# -- real sessions -------------------------------------------------------------------------------

@pytest.fixture
def tracing():
    """Kernel tracing works here; on the way out, nothing of ours is left behind."""
    need(os.geteuid() == 0, "kernel tracing needs root")
    p = probe()
    need(p["available"], f"kernel tracing unavailable: {p['reason']}")
    mounts = Path("/proc/mounts").read_text()
    root = find_tracefs(mounts)
    before = set(leftover_instances(root)) if root else set()
    yield p
    assert Path("/proc/mounts").read_text() == mounts
    if root:
        assert set(leftover_instances(root)) == before
        assert not [n for n in os.listdir(Path(root) / "instances") if n.startswith(f"kvmsplit-{os.getpid()}-")]


SCENARIO = """
[[scenario]]
name = "{name}"
size = "32M"
backing = "{backing}"
guest_page = "{page}"
passes = 1
"""


class GatedRun:
    """`kvmsplit run` in a child that waits on stdin before it execs (same pid): sessions for
    its pid are opened before it does anything."""

    def __init__(self, tmp_path, backing="thp", page="2m"):
        name = f"trace-{backing}-{page}"
        (tmp_path / "s.toml").write_text(SCENARIO.format(name=name, backing=backing, page=page))
        argv = [sys.executable, "-m", "kvmsplit", "run", "--scenario", str(tmp_path / "s.toml"),
                "-o", str(tmp_path / "out"), "--db", str(tmp_path / "history.sqlite")]
        gate = f"import os, sys; sys.stdin.readline(); os.execv({sys.executable!r}, {argv!r})"
        self.out = tmp_path / "out"
        self.p = subprocess.Popen([sys.executable, "-c", gate], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, cwd=REPO)
        self.pid = self.p.pid

    def go(self, timeout=300):
        out, _ = self.p.communicate(b"go\n", timeout=timeout)
        assert self.p.returncode == 0, out.decode(errors="replace")
        return json.loads((self.out / "results.json").read_text())

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def gated(tmp_path):
    runs = []

    def make(**kw):
        runs.append(GatedRun(tmp_path, **kw))
        return runs[-1]
    yield make
    for r in runs:
        r.kill()


@pytest.mark.kvm
def test_a_real_run_seen_by_four_sessions_at_once(tracing, gated):
    """THP 2M on this host's shadow MMU: lazy, so no split events, but 4K mappings made on the
    write faults (new direct l1 shadow pages) and huge mappings installed (set_spte level 2).
    Four sessions at once: two formats, a private mount, and one for a process that ran no VM."""
    run = gated()
    with TraceSession(run.pid) as a, \
         TraceSession(run.pid, fields=False, filter_pids=False) as b, \
         TraceSession(run.pid, private_mount=True) as c, \
         TraceSession(os.getpid()) as other:
        assert len({a.instance, b.instance, c.instance, other.instance}) == 4
        assert c.fs is not None and c.fs.mounted_here
        assert c.instance is not None and c.instance.name in os.listdir(a.instance.parent)  # one tracefs
        results = run.go()
        raw_b = b.take_raw()
        pa, pc, po = a.take(), c.take(), other.take()
        pb = PhaseTrace.from_text(raw_b.text, run.pid, lost=raw_b.lost)
        again = a.take()
    print(f"\nthp 32M 2m: {pa.to_dict()}")
    assert [s["verdict"] for s in results["scenarios"]] == ["PASS"]
    assert pa.new_direct_l1 > 0
    assert pa.huge_mapped_by_level.get(2, 0) > 0
    assert pa.splits == 0 and pa.split_gfns == 0
    assert pa.regions_dismantled >= pa.new_direct_l1_gfns > 0
    assert (pa.lost, pa.unparsed, pa.foreign) == (0, 0, 0)
    assert pa.new_direct_l1_guest_mode == (0 if a.fields else None)
    assert pc == pa
    # b also holds other processes' events (any VM on the host): counted as foreign, never as ours
    assert pb == PhaseTrace(**{**pa.__dict__, "new_direct_l1_guest_mode": None, "foreign": pb.foreign})
    if pb.foreign:
        print("other processes' lines in the unfiltered instance:",
              sorted({ln.split(")")[0] for ln in raw_b.text.splitlines() if f"({run.pid:7d})" not in ln}))
    assert po.events == 0 and po.foreign == 0          # filtered in the kernel: nothing of the child
    assert parse_trace(raw_b.text, os.getpid()) == []  # and by TGID in the text
    assert parse_trace(raw_b.text, run.pid)
    assert again.events == 0                            # take() consumed what it summarised
    for s in (a, b, c, other):
        assert s.closed and s.instance is not None and not s.instance.exists()


@pytest.mark.kvm
def test_a_buffer_too_small_reports_lost_events(tracing, gated):
    """Every 4K mapping traced (no filter) into the smallest buffer: the kernel drops events and
    take() says how many."""
    run = gated(backing="anon", page="4k")
    everything = (EventSpec("kvmmmu", "kvm_mmu_set_spte"),)
    with TraceSession(run.pid, everything, buffer_kb=1) as s:
        run.go()
        pt = s.take()
    print(f"\nanon 32M 4k, 1K buffer: {pt.events} events kept, {pt.lost} lost")
    assert pt.lost > 0
    assert pt.events > 0


@pytest.mark.kvm
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_close_removes_the_instance_after_an_exception(tracing, exc):
    with pytest.raises(exc):
        with TraceSession(private_mount=True) as s:
            inst, root = s.instance, s.fs.root
            assert inst.is_dir()
            raise exc()
    assert s.closed
    assert not inst.exists()
    assert not root.exists()                       # its private mount is gone too
    s.close()                                      # idempotent
    with pytest.raises(ValueError):
        s.take()


@pytest.mark.kvm
def test_an_interrupt_while_opening_leaves_nothing(tracing, monkeypatch):
    made = []

    def interrupted(self, inst, specs):
        made.append(inst)
        assert inst.is_dir()
        raise KeyboardInterrupt
    monkeypatch.setattr(TraceSession, "_configure", interrupted)
    s = TraceSession(private_mount=True)
    with pytest.raises(KeyboardInterrupt):
        s.open()
    assert made and not made[0].exists()
    assert s.closed


@pytest.mark.kvm
def test_a_close_cut_short_can_be_called_again(tracing, monkeypatch):
    s = TraceSession().open()
    inst = s.instance
    real_rmdir = os.rmdir
    calls = []

    def rmdir_interrupted(path, *a, **kw):
        if not calls:
            calls.append(path)
            raise KeyboardInterrupt                 # a second Ctrl-C during close()
        return real_rmdir(path, *a, **kw)
    monkeypatch.setattr(os, "rmdir", rmdir_interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.close()
    assert inst.exists() and not s.closed
    s.close()
    assert not inst.exists() and s.closed


@pytest.mark.kvm
def test_probe_finds_the_events_and_leaves_nothing_mounted(tracing):
    mounts = Path("/proc/mounts").read_text()
    p = probe(private=True)
    assert p == {"available": True, "reason": None, "mounted": None,
                 "events": ["kvm_mmu_split_huge_page", "kvm_mmu_get_page", "kvm_mmu_set_spte"]}
    assert Path("/proc/mounts").read_text() == mounts
    assert tracing["mounted"] == find_tracefs(mounts)


@pytest.mark.kvm
def test_sessions_use_a_mounted_tracefs_or_mount_and_unmount_their_own(tracing):
    mounts = Path("/proc/mounts").read_text()
    fs = Tracefs.open()
    try:
        if find_tracefs(mounts):
            assert not fs.mounted_here and str(fs.root) == find_tracefs(mounts)
        else:
            assert fs.mounted_here and str(fs.root) in Path("/proc/mounts").read_text()
    finally:
        fs.close()
    with TraceSession(private_mount=True) as s:
        assert f" {s.fs.root} tracefs " in Path("/proc/mounts").read_text()
    assert Path("/proc/mounts").read_text() == mounts


RECOVER_IN_NEW_PID_NS = ("from kvmsplit.tracing.tracefs import recover_stale, pid_namespace; "
                         "import json; print(json.dumps([pid_namespace(), recover_stale()]))")


def test_a_kvmsplit_in_another_pid_namespace_leaves_our_live_session_alone(tracing):
    """tracefs instances are global, pids are not: a kvmsplit in a container (or a test's
    'remote box') cannot see our pid, so it must not take our live instance for a dead
    one. Seen for real: a concurrent run in a new pid namespace removed a live run's instance
    mid-scenario (trace_pipe gone). Old instance names (no namespace) are still judged."""
    need(shutil.which("unshare") is not None, "unshare not installed")
    with TraceSession() as ts:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                            RECOVER_IN_NEW_PID_NS], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "runner")})
        assert r.returncode == 0, r.stderr
        their_ns, done = json.loads(r.stdout)
        assert their_ns != pid_namespace()
        assert not [d for d in done if ts.instance.name in d], done
        assert ts.instance.exists()
        ts.take()                   # still ours, still readable


def test_an_empty_mount_point_of_a_dead_run_is_removed_and_a_live_ones_is_kept(tracing):
    """A killed run whose mount namespace ended leaves only an empty directory; the next run removes
    it. One of a live process (ours) and one that is not empty stay."""
    from kvmsplit.tracing.tracefs import recover_stale
    p = subprocess.Popen(["true"])            # a pid that no longer exists
    p.wait()
    dead = p.pid
    tmp = Path(tempfile.gettempdir())
    stale = tmp / f"kvmsplit-tracefs-{dead}-ns{pid_namespace()}-test"
    live = tmp / f"kvmsplit-tracefs-{os.getpid()}-ns{pid_namespace()}-test"
    full = tmp / f"kvmsplit-tracefs-{dead}-ns{pid_namespace()}-full"
    for d in (stale, live, full):
        d.mkdir()
    (full / "x").write_text("keep")
    try:
        done = recover_stale()
        assert f"empty tracefs mount point {stale}" in done and not stale.exists()
        assert live.exists() and full.exists()
    finally:
        shutil.rmtree(full, ignore_errors=True)
        for d in (stale, live):
            if d.exists():
                d.rmdir()
