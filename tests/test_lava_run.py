"""contrib/lava/kvmsplit-qemu-job.yaml run for real by `lava-run` (Debian's
lava-dispatcher), with contrib/lava/qemu-device.yaml as the device: QEMU
boots the 6.12 kernel under test from the busybox ramdisk make-ramdisk.sh
builds, and inside the guest kvmsplit-ktap.yaml reports the KTAP that
kvmsplit's own KTAP writer made, through ktap-to-lava.sh, the step
kvmsplit.yaml (the nightly job) reports with. The test definitions come from
a git repository of the working tree's contrib/lava, as LAVA clones them.

lava-run runs in PID and mount namespaces of its own: its scratch directory
(/var/lib/lava/dispatcher/tmp) is a bind mount of one under tmp_path, and
whatever it started (QEMU) dies with the namespace, on a timeout too. QEMU
uses KVM where the host can nest and TCG elsewhere (kvmsplit's choose_accel),
as the device template's no_kvm does."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import need
from kvmsplit.kernel.vm import choose_accel
from kvmsplit.report.ktap import ktap_text
from kvmsplit.runs.results import RunResult, ScenarioResult

pytestmark = pytest.mark.timeout(3600)      # the first kernel_612 build takes 10-20 minutes

CONTRIB_LAVA = Path(__file__).resolve().parents[1] / "contrib" / "lava"
STAGING = "/tmp/kvmsplit-lava"              # where the job template finds its kernel, ramdisk and repository
LAVA_SCRATCH = Path("/var/lib/lava/dispatcher/tmp")
KVM_OPTIONS = ("-cpu host", "-enable-kvm")
RUN_TIMEOUT = 300

# real scenario names, each with a kvmsplit verdict and the LAVA result the guest must report for it
VERDICTS = {
    "anon/4k/bitmap": ("PASS", "pass"),
    "thp/2m/ring": ("SKIP", "skip"),
    "thp/2m/manual": ("FAIL", "fail"),
    "anon/2m/ring": ("UNCONFIRMED", "fail"),
    "thp/4k/manual": ("ERROR", "fail"),
}
KTAP_SUITE = "0_kvmsplit-ktap"
EMPTY_SUITE = "1_kvmsplit-ktap-empty"


def static_busybox() -> bool:
    busybox = shutil.which("busybox")
    return busybox is not None and subprocess.run(["ldd", busybox], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def lava_tools():
    need(os.geteuid() == 0, "lava-run runs as root")
    for tool, package in (("lava-run", "lava-dispatcher"), ("qemu-system-x86_64", "qemu-system-x86"),
                          ("unshare", "util-linux"), ("cpio", "cpio"), ("git", "git")):
        need(shutil.which(tool) is not None, f"{tool} not installed (Debian: {package})")
    need(static_busybox(), "no static busybox (Debian: busybox-static)")


# -- what the job needs, staged under the test's own directory ------------------------------
def kvmsplit_ktap(path: Path) -> None:
    rr = RunResult(host={}, argv=[], kvmsplit_version="test")
    rr.scenarios = [ScenarioResult(name=name, scenario={}, verdict=verdict, reasons=[f"{verdict.lower()} here"])
                    for name, (verdict, _) in VERDICTS.items()]
    path.write_text(ktap_text(rr, str(path.with_name("results.json"))))


def make_ramdisk(out: Path, ktap: Path, tmp: Path) -> None:
    subprocess.run(["sh", str(CONTRIB_LAVA / "make-ramdisk.sh"), str(out), str(ktap)], check=True,
                   env={**os.environ, "TMPDIR": str(tmp)}, timeout=120)


def definitions_repository(repo: Path) -> None:
    """A git repository holding the working tree's contrib/lava, for LAVA to clone."""
    shutil.copytree(CONTRIB_LAVA, repo / "contrib" / "lava")
    git = ["git", "-C", str(repo), "-c", "user.name=kvmsplit tests", "-c", "user.email=tests@kvmsplit.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "contrib/lava"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=60)


def stage(stage_dir: Path, kernel: str) -> None:
    """What the job template looks for under /tmp/kvmsplit-lava, under stage_dir instead."""
    stage_dir.mkdir()
    shutil.copy(kernel, stage_dir / "bzImage")
    kvmsplit_ktap(stage_dir / "results.ktap")
    make_ramdisk(stage_dir / "ramdisk.cpio.gz", stage_dir / "results.ktap", stage_dir)
    definitions_repository(stage_dir / "kvmsplit")


def device_file(path: Path) -> Path:
    device = yaml.safe_load((CONTRIB_LAVA / "qemu-device.yaml").read_text())
    if choose_accel().name == "tcg":
        qemu = device["actions"]["boot"]["methods"]["qemu"]["parameters"]
        qemu["options"] = [o for o in qemu["options"] if o not in KVM_OPTIONS]
    path.write_text(yaml.safe_dump(device))
    return path


def job_file(path: Path, stage_dir: Path, prompt: str | None = None) -> Path:
    """The template with its staging directory moved, plus a second run of
    kvmsplit-ktap.yaml on a file with no KTAP in it."""
    job = yaml.safe_load((CONTRIB_LAVA / "kvmsplit-qemu-job.yaml").read_text().replace(STAGING, str(stage_dir)))
    [test] = [a["test"] for a in job["actions"] if "test" in a]
    empty = dict(test["definitions"][0], name="kvmsplit-ktap-empty", parameters={"KTAP_FILE": "/init"})
    test["definitions"].append(empty)
    if prompt is not None:
        [boot] = [a["boot"] for a in job["actions"] if "boot" in a]
        boot["prompts"] = [prompt]
    path.write_text(yaml.safe_dump(job))
    return path


# -- lava-run in namespaces of its own ------------------------------------------------------
def namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in(namespace: str) -> list[str]:
    """The commands of every live process in a PID namespace, seen from here."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespace_of(int(entry)) == namespace:
            try:
                found.append(Path(f"/proc/{entry}/comm").read_text().strip())
            except OSError:
                pass
    return found


class LavaRun:
    """`lava-run` as PID 1 of a PID namespace (unshare --kill-child: it is
    SIGKILLed when unshare is, and the kernel then kills the rest), with the
    dispatcher's scratch directory bind-mounted from the test's own."""

    def __init__(self, workdir: Path, job: Path, device: Path):
        self.workdir, self.scratch, self.out = workdir, workdir / "lava-scratch", workdir / "lava-output"
        self.scratch.mkdir()
        self.log = workdir / "lava-run.log"
        script = 'mount --bind "$0" /var/lib/lava/dispatcher/tmp && exec lava-run "$@"'
        cmd = ["unshare", "--mount-proc", "--pid", "--fork", "--kill-child", "--propagation", "private",
               "sh", "-c", script, str(self.scratch), "--job-id", "1", "--output-dir", str(self.out),
               "--device", str(device), str(job)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}   # lava-run is /usr/bin/python3's
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.namespace = self._child_namespace()

    def _child_namespace(self) -> str:
        mine, deadline = namespace_of(os.getpid()), time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            for child in children.read_text().split() if children.exists() else []:
                ns = namespace_of(int(child))
                if ns and ns != mine:
                    return ns
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"lava-run did not start in a PID namespace of its own: {self.log.read_text()[-2000:]}")

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"lava-run ran past {timeout} s: {self.log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        """Everything lava-run started goes with it: returns once the namespace is empty."""
        self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 30
        while processes_in(self.namespace) and time.monotonic() < deadline:
            time.sleep(0.1)

    def records(self) -> list[dict]:
        """lava-run's log: one YAML mapping a line."""
        return [yaml.safe_load(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


def results(records: list[dict], definition: str) -> dict[str, str]:
    return {r["msg"]["case"]: r["msg"]["result"] for r in records
            if r["lvl"] == "results" and r["msg"].get("definition") == definition}


def target_output(records: list[dict]) -> list[str]:
    """What came over the guest's serial console."""
    return [str(r["msg"]) for r in records if r["lvl"] == "target"]


@dataclass
class Finished:
    rc: int
    records: list[dict]
    run: LavaRun


def host_lava_scratch() -> list[str]:
    return sorted(os.listdir(LAVA_SCRATCH)) if LAVA_SCRATCH.is_dir() else []


@pytest.fixture(scope="module")
def host_scratch() -> list[str]:
    """The host's own LAVA scratch directory before the runs, which they must leave as it was."""
    return host_lava_scratch()


@pytest.fixture(scope="module")
def lava_job(lava_tools, kernel_612, tmp_path_factory, host_scratch) -> Finished:
    work = tmp_path_factory.mktemp("lava-run")
    stage(work / "stage", kernel_612)
    run = LavaRun(work, job_file(work / "job.yaml", work / "stage"), device_file(work / "device.yaml"))
    try:
        rc = run.wait()
    finally:
        run.kill()
    return Finished(rc, run.records(), run)


# -- the tests ------------------------------------------------------------------------------
def test_lava_run_finishes_the_job(lava_job):
    assert lava_job.rc == 0, lava_job.run.log.read_text()[-3000:]
    assert results(lava_job.records, "lava")["job"] == "pass"
    assert results(lava_job.records, "lava")[KTAP_SUITE] == "pass"


def test_each_ktap_result_comes_back_as_the_lava_result_of_its_scenario(lava_job):
    """ok: pass, ok # SKIP: skip, and every not ok (plain, UNCONFIRMED, ERROR): fail."""
    assert results(lava_job.records, KTAP_SUITE) == {name: lava for name, (_, lava) in VERDICTS.items()}


def test_the_results_were_reported_from_inside_the_booted_kernel_under_test(lava_job, kernel_612):
    console = target_output(lava_job.records)
    release = json.loads((Path(kernel_612).parent / "info.json").read_text())["release"]
    assert any(f"Linux version {release}" in line for line in console)
    assert any("ktap-to-lava.sh /kvmsplit.ktap" in line for line in console)
    signals = [line for line in console if line.startswith("<LAVA_SIGNAL_TESTCASE ")]
    assert signals == [f"<LAVA_SIGNAL_TESTCASE TEST_CASE_ID={name} RESULT={lava}>"
                       for name, (_, lava) in VERDICTS.items()] + \
                      ["<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=ktap-results RESULT=fail>"]


def test_a_guest_file_without_ktap_results_is_a_failed_test_case_not_a_pass(lava_job):
    assert results(lava_job.records, EMPTY_SUITE) == {"ktap-results": "fail"}


def test_lava_run_leaves_nothing_behind(lava_job, host_scratch):
    assert processes_in(lava_job.run.namespace) == []
    assert os.listdir(lava_job.run.scratch) == []          # lava-run removed its job directory itself
    assert host_lava_scratch() == host_scratch


def test_a_lava_run_stopped_mid_job_takes_its_qemu_with_it(lava_tools, kernel_612, tmp_path, host_scratch):
    """A boot prompt that never comes keeps QEMU running; the stop that a
    timeout uses must leave neither lava-run nor QEMU."""
    stage(tmp_path / "stage", kernel_612)
    job = job_file(tmp_path / "job.yaml", tmp_path / "stage", prompt="a prompt this ramdisk never prints")
    run = LavaRun(tmp_path, job, device_file(tmp_path / "device.yaml"))
    try:
        deadline = time.monotonic() + 120
        while not any(c.startswith("qemu-system") for c in processes_in(run.namespace)):
            assert time.monotonic() < deadline and run.proc.poll() is None, run.log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        run.kill()
    assert processes_in(run.namespace) == []
    assert host_lava_scratch() == host_scratch
