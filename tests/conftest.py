"""Fixtures that build real VMs, Firecracker-style: tests say what they want
(a scenario, a machine) and the fixtures own set-up and teardown.

Tests that need /dev/kvm are marked `kvm`. Without /dev/kvm they skip, except
under KVMSPLIT_REQUIRE_KVM=1 (CI on a KVM machine), where a skip would hide a
broken environment, so they fail instead.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

REQUIRE_KVM = os.environ.get("KVMSPLIT_REQUIRE_KVM") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; fail under KVMSPLIT_REQUIRE_KVM=1."""
    if condition:
        return
    if REQUIRE_KVM:
        pytest.fail(f"required but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _kvm_usable() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        return f"/dev/kvm unusable: {e.strerror}"
    os.close(fd)
    return None


# The user's own kvmsplit state, which no test may touch: its history and its cache.
USER_STATE = [Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "kvmsplit",
              Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvmsplit"]


def _fingerprint(paths):
    """Every file under the user's kvmsplit directories, with its size and mtime."""
    out = {}
    for top in paths:
        for root, _, files in os.walk(top):
            for f in files:
                p = Path(root) / f
                try:
                    st = p.lstat()
                except OSError:
                    continue
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """Runs made by tests (here, or in kvmsplit subprocesses, which inherit the
    environment) keep their history in a temporary home and their builds in a
    cache of the tests' own (kept between runs: the kernel builds take minutes),
    never in the user's."""
    # a CI job's timeout sends SIGTERM: unwind as on Ctrl-C, so that fixtures put the
    # host back (sshd, VMs, pools) and the session's temporary home goes
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if "KVMSPLIT_DATA_DIR" not in os.environ:
        os.environ["KVMSPLIT_DATA_DIR"] = tempfile.mkdtemp(prefix="kvmsplit-test-data-")
    if "KVMSPLIT_CACHE_DIR" not in os.environ:
        os.environ["KVMSPLIT_CACHE_DIR"] = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                               / "kvmsplit-test")
    config._kvmsplit_user_state = _fingerprint(USER_STATE)
    config._kvmsplit_state_seen = config._kvmsplit_user_state
    config._kvmsplit_state_culprits = []


def pytest_runtest_teardown(item, nextitem):
    """After each test module: did it change the user's state? The session's
    verdict names the module, so that a fresh CI box's one-line failure says
    where to look."""
    if nextitem is not None and nextitem.module is item.module:
        return
    config = item.config
    now = _fingerprint(USER_STATE)
    if now != config._kvmsplit_state_seen:
        config._kvmsplit_state_culprits.append(item.module.__name__)
        config._kvmsplit_state_seen = now


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_kvmsplit_user_state", None)
    now = _fingerprint(USER_STATE) if before is not None else None
    if before is not None and now != before:
        changed = sorted(set(now.items()) ^ set(before.items()))[:5]
        by = ", ".join(session.config._kvmsplit_state_culprits) or "unknown (after the last module)"
        print(f"\nFAILED: the test run changed the user's kvmsplit state (in {by}): {changed}")
        session.exitstatus = 1
    data = os.environ.get("KVMSPLIT_DATA_DIR", "")
    if "kvmsplit-test-data-" in data:         # ours, made in pytest_configure
        shutil.rmtree(data, ignore_errors=True)


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm"):
        why = _kvm_usable()
        need(why is None, why or "")


@pytest.fixture(scope="session")
def kvm():
    need(_kvm_usable() is None, "/dev/kvm unusable")
    from kvmsplit.vmm.kvm import Kvm
    k = Kvm()
    yield k
    k.close()


@pytest.fixture(scope="session")
def facts(kvm):
    from kvmsplit.host.facts import probe
    return probe(kvm)


@pytest.fixture(scope="session")
def guest_image():
    from kvmsplit.vmm.guest.build import guest_image as build
    return build()


@pytest.fixture(scope="session")
def host_changes():
    """Hugetlb pools grown for the session, restored at its end."""
    from kvmsplit.host.changes import HostChanges
    with HostChanges() as hc:
        yield hc


@pytest.fixture
def witness():
    """The tracepoint witness, as `kvmsplit run` sets it up (tracefs found or mounted, and
    one trace instance), for one test: tests check that no instance of theirs is left."""
    from kvmsplit.scenario.witness import Witness
    w = Witness.open()
    yield w
    w.close()


@pytest.fixture
def run_scenario(kvm, facts, guest_image, host_changes, witness):
    """run_scenario(Scenario, **RunOptions fields) -> ScenarioResult, for real."""
    from kvmsplit.scenario.engine import RunOptions, ScenarioRun

    def run(scenario, **opts):
        return ScenarioRun(scenario, facts, guest_image, host_changes, kvm, RunOptions(**opts), witness).run()
    return run


# -- the kernel under test: built once, shared by every test that boots it ---------------
def build_kernel(*mboxes) -> str:
    """`kvmsplit kernel build` (cached by commit, patches and config): the image path."""
    import json
    import subprocess
    import sys
    args = [sys.executable, "-m", "kvmsplit", "kernel", "build", "--json"]
    for m in mboxes:
        args += ["--mbox", str(m)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["image"]


@pytest.fixture(scope="session")
def vm_tools():
    import glob
    import shutil
    need(bool(glob.glob("/usr/src/linux-source-6.12*")), "linux-source-6.12 not installed")
    for tool in ("qemu-system-x86_64", "busybox", "flex", "bison", "bc"):
        need(shutil.which(tool) is not None, f"{tool} not installed")


@pytest.fixture(scope="session")
def kernel_612(vm_tools):
    """Debian's linux-source-6.12 as `kvmsplit kernel build` makes it: a TDP-MMU KVM host with
    nested SVM under `kvmsplit vm`. The first build takes 10-20 minutes; then it is cached."""
    return build_kernel()


def kvmsplit_vm(image, *run_args, out, timeout=1800):
    """`kvmsplit vm --kernel IMAGE -- kvmsplit run ARGS --output OUT`: (exit code, results)."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "vm", "--kernel", image, "--", "kvmsplit", "run",
                        *map(str, run_args), "--output", str(out)], capture_output=True, text=True, timeout=timeout)
    res = json.loads((out / "results.json").read_text())
    assert res["host"]["vm"]["state"] == "done", r.stderr[-3000:]
    return r.returncode, res


@pytest.fixture(scope="session")
def clean_run(kernel_612, tmp_path_factory):
    """The whole default suite inside the unpatched 6.12 kernel, once per session:
    (exit code, results). The planted-bug and nested tests compare against it."""
    return kvmsplit_vm(kernel_612, out=tmp_path_factory.mktemp("clean-612"))
