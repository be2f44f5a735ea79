"""contrib/'s CI templates for nightly series validation, checked against
the engines' own schemas: GitLab's CI JSON schema (a pinned copy,
contrib/schemas/) with jsonschema, and LAVA's job and test-definition
schemas from Debian's lava-common (run with the system Python that package
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
import json, sys, yaml
from voluptuous import Schema
from lava_common.schemas import validate
from lava_common.schemas.test.testdef import testdef
job, testdef_doc = json.loads(sys.stdin.read())
out = {}
for name, check in (("job", lambda: validate(job, strict=True)),
                    ("testdef", lambda: Schema(testdef())(testdef_doc))):
    try:
        check()
        out[name] = None
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def lava_check(job: dict, testdef: dict) -> dict:
    need(Path(SYSTEM_PYTHON).exists() and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import lava_common.schemas"], capture_output=True).returncode == 0,
        "Debian's lava-common is not installed (scripts/bootstrap.sh test installs it)")
    r = subprocess.run([SYSTEM_PYTHON, "-c", LAVA_CHECK], input=json.dumps([job, testdef]), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def lava_templates() -> tuple[dict, dict]:
    return (yaml.safe_load((CONTRIB / "lava" / "kvmsplit-job.yaml").read_text()),
            yaml.safe_load((CONTRIB / "lava" / "kvmsplit.yaml").read_text()))


def test_the_lava_job_and_test_definition_pass_lava_commons_validators():
    job, testdef = lava_templates()
    assert lava_check(job, testdef) == {"job": None, "testdef": None}
    [test] = [a["test"] for a in job["actions"] if "test" in a]
    assert test["definitions"][0]["path"] == "contrib/lava/kvmsplit.yaml"
    assert any("kvmsplit run" in s for s in testdef["run"]["steps"])


def test_the_lava_check_rejects_a_broken_job_and_test_definition():
    job, testdef = lava_templates()
    job["actions"][1]["boot"]["method"] = "warp-drive"
    del testdef["metadata"]["format"]
    got = lava_check(job, testdef)
    assert got["job"] and "boot" in got["job"], got
    assert got["testdef"] and "format" in got["testdef"], got


def test_the_jenkins_pipeline_locks_each_box_and_publishes_junit_and_artifacts():
    text = (CONTRIB / "jenkins" / "Jenkinsfile").read_text()
    assert text.count("{") == text.count("}")
    for needle in ('lock(resource: "kvmsplit-${BOX}")', 'label "kvm && ${BOX}"', "junit testResults:",
                   "archiveArtifacts", "kvmsplit series"):
        assert needle in text, needle
