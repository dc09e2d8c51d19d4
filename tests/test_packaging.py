"""pyproject.toml builds without setuptools' deprecation warnings (four blocks on every install)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_applies_without_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # build-system.requires asks for setuptools>=77, the first to read an SPDX `license` string
    pytest.importorskip("setuptools", minversion="77")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)  # readme and package discovery are relative to the project
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


def test_the_package_version_is_the_runtimes() -> None:
    """bundle.json `requirements.edge_llm` is compared with `edge_llm.__version__`: the installed
    distribution must say the same version, or `pip show` and the refusal disagree."""
    from edge_llm import __version__
    from edge_llm.config import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == __version__
