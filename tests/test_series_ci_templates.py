"""contrib/'s CI templates for nightly series validation, checked against
the engines' own schemas: GitLab's CI JSON schema (a pinned copy,
contrib/schemas/) with jsonschema, and LAVA's job, test-definition and
device schemas from Debian's lava-common (run with the system Python that package
installs into). Each check is also shown rejecting a broken template.
Jenkins has no schema or linter that works offline: its Jenkinsfile is only
checked here for the per-box lock, label and publishing steps."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import need

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"
GITLAB_SCHEMA_SHA256 = "1c6eeb7d3a34c39996afbfe1ade220480eb05bbeae674e86d3c745dfeeded7fd"
SYSTEM_PYTHON = "/usr/bin/python3"


def gitlab_errors(doc: dict) -> list[str]:
    schema_file = CONTRIB / "schemas" / "gitlab-ci.json"
    assert hashlib.sha256(schema_file.read_bytes()).hexdigest() == GITLAB_SCHEMA_SHA256, \
        "the pinned GitLab schema changed: update contrib/schemas/SOURCE.md and this digest together"
    schema = json.loads(schema_file.read_text())
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def gitlab_template() -> dict:
    return yaml.safe_load((CONTRIB / "gitlab" / "kvmsplit-nightly.gitlab-ci.yml").read_text())


def test_the_gitlab_template_is_valid_gitlab_ci_with_a_job_and_a_resource_group_per_box():
    doc = gitlab_template()
    assert gitlab_errors(doc) == []
    job = doc["kvmsplit-series"]
    boxes = job["parallel"]["matrix"][0]["BOX"]
    assert len(boxes) >= 2 and "$BOX" in job["tags"] and "$BOX" in job["resource_group"]
    assert any("kvmsplit series" in line for line in job["script"])
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["reports"]["junit"]


@pytest.mark.parametrize("breakage", ["a misspelled key", "tags as a number", "a bad artifacts.when"])
def test_the_gitlab_check_rejects_a_broken_template(breakage):
    doc = copy.deepcopy(gitlab_template())
    job = doc["kvmsplit-series"]
    if breakage == "a misspelled key":
        job["scrpt"] = job.pop("script")
    elif breakage == "tags as a number":
        job["tags"] = 7
    else:
        job["artifacts"]["when"] = "sometimes"
    assert gitlab_errors(doc), breakage


LAVA_CHECK = r"""
import json, sys
from voluptuous import Schema
from lava_common.schemas import validate
from lava_common.schemas.device import validate as validate_device
from lava_common.schemas.test.testdef import testdef
checks = {"job": lambda doc: validate(doc, strict=True), "testdef": lambda doc: Schema(testdef())(doc),
          "device": validate_device}
out = {}
for name, (kind, doc) in json.loads(sys.stdin.read()).items():
    try:
        checks[kind](doc)
        out[name] = None
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""
# contrib/lava/: each file and the lava-common validator it must pass
LAVA_FILES = {"kvmsplit-job.yaml": "job", "kvmsplit-qemu-job.yaml": "job", "kvmsplit.yaml": "testdef",
              "kvmsplit-ktap.yaml": "testdef", "qemu-device.yaml": "device"}


def lava_check(docs: dict[str, dict]) -> dict[str, str | None]:
    """Each contrib/lava document through its validator: None, or the error."""
    need(Path(SYSTEM_PYTHON).exists() and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import lava_common.schemas"], capture_output=True).returncode == 0,
        "Debian's lava-common is not installed (scripts/bootstrap.sh test installs it)")
    checks = {name: (LAVA_FILES[name], doc) for name, doc in docs.items()}
    r = subprocess.run([SYSTEM_PYTHON, "-c", LAVA_CHECK], input=json.dumps(checks), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def lava_templates() -> dict[str, dict]:
    return {name: yaml.safe_load((CONTRIB / "lava" / name).read_text()) for name in LAVA_FILES}


def test_the_lava_jobs_test_definitions_and_device_pass_lava_commons_validators():
    assert lava_check(lava_templates()) == dict.fromkeys(LAVA_FILES)


def lava_actions(doc: dict, action: str) -> list[dict]:
    return [a[action] for a in doc["actions"] if action in a]


def test_both_lava_test_definitions_report_ktap_with_the_one_shared_step():
    docs = lava_templates()
    [nightly] = lava_actions(docs["kvmsplit-job.yaml"], "test")
    assert nightly["definitions"][0]["path"] == "contrib/lava/kvmsplit.yaml"
    assert any("kvmsplit run" in s for s in docs["kvmsplit.yaml"]["run"]["steps"])
    for name in ("kvmsplit.yaml", "kvmsplit-ktap.yaml"):
        steps = docs[name]["run"]["steps"]
        assert any("contrib/lava/ktap-to-lava.sh" in s for s in steps), name
        assert not any("lava-test-case" in s for s in steps), f"{name} reports on its own, not with ktap-to-lava.sh"
    assert (CONTRIB / "lava" / "ktap-to-lava.sh").is_file()


def test_the_local_qemu_job_boots_a_kernel_and_ramdisk_on_the_rendered_qemu_device():
    docs = lava_templates()
    job, device = docs["kvmsplit-qemu-job.yaml"], docs["qemu-device.yaml"]
    assert job["device_type"] == "qemu" and job["context"]["arch"] == "amd64"
    assert device["actions"]["boot"]["methods"]["qemu"]["parameters"]["command"] == "qemu-system-x86_64"
    [deploy] = lava_actions(job, "deploy")
    images = deploy["images"]
    assert deploy["to"] == "tmpfs" and all(i["url"].startswith("file:///") for i in images.values())
    assert images["ramdisk"]["format"] == "cpio.newc" and images["ramdisk"]["overlays"] == {"lava": True}
    [boot] = lava_actions(job, "boot")
    assert boot["method"] == "qemu" and boot["prompts"]
    [test] = lava_actions(job, "test")
    assert [d["path"] for d in test["definitions"]] == ["contrib/lava/kvmsplit-ktap.yaml"]


def break_lava_templates() -> dict[str, tuple[dict, str]]:
    """One breakage a document, with a word its error must name."""
    docs = lava_templates()
    lava_actions(docs["kvmsplit-job.yaml"], "boot")[0]["method"] = "warp-drive"
    lava_actions(docs["kvmsplit-qemu-job.yaml"], "deploy")[0]["images"]["ramdisk"]["format"] = "cpio.odc"
    del docs["kvmsplit.yaml"]["metadata"]["format"]
    docs["kvmsplit-ktap.yaml"]["run"]["stepz"] = docs["kvmsplit-ktap.yaml"]["run"].pop("steps")
    del docs["qemu-device.yaml"]["timeouts"]
    words = {"kvmsplit-job.yaml": "['boot']", "kvmsplit-qemu-job.yaml": "['ramdisk']['format']",
             "kvmsplit.yaml": "['metadata']['format']", "kvmsplit-ktap.yaml": "['run']['stepz']",
             "qemu-device.yaml": "['timeouts']"}
    return {name: (docs[name], words[name]) for name in LAVA_FILES}


def test_the_lava_check_rejects_each_broken_job_test_definition_and_device():
    broken = break_lava_templates()
    got = lava_check({name: doc for name, (doc, _) in broken.items()})
    for name, (_, word) in broken.items():
        error = got[name]
        assert error is not None and word in error, (name, error)


def test_the_jenkins_pipeline_locks_each_box_and_publishes_junit_and_artifacts():
    text = (CONTRIB / "jenkins" / "Jenkinsfile").read_text()
    assert text.count("{") == text.count("}")
    for needle in ('lock(resource: "kvmsplit-${BOX}")', 'label "kvm && ${BOX}"', "junit testResults:",
                   "archiveArtifacts", "kvmsplit series"):
        assert needle in text, needle
