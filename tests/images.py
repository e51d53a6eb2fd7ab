"""What the Dockerfile's stages set, for the tests that check a deployment (compose, Kubernetes,
KServe) against the image it runs: the image's ENV lies under the deployment's environment, so
the two together must be a valid configuration."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
#: The API images by the name the deployments pull them under.
API_IMAGES = {"sepconv-serve/api": "runtime-cpu", "sepconv-serve/api-cuda": "runtime-cuda"}


def stage(name: str) -> str:
    """The text of one Dockerfile stage, from after its FROM line to the next FROM."""
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert match, f"no stage {name}"
    return match.group(1)


def _parents() -> dict[str, str]:
    """Each stage's FROM: another stage, or a base image."""
    return dict(
        (name, parent)
        for parent, name in re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE.read_text(), re.M)
    )


def image_env(name: str) -> dict[str, str]:
    """The ENV a container of stage ``name`` starts with (its own and its parent stages'; base
    images from a registry add none of ours)."""
    parents = _parents()
    env = image_env(parents[name]) if parents[name] in parents else {}
    for line in stage(name).replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:], comments=True):
                key, _, value = pair.partition("=")
                env[key] = value
    return env
