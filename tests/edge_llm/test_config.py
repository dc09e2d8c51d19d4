from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from edge_llm.config import from_dict, load_toml
from edge_llm.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    ratio: float = 0.0
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError("ratio must be in [0, 1)")


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()


def test_builds_nested_and_coerces() -> None:
    got = from_dict(Outer, {"name": "x", "inner": {"ratio": 0, "mode": "b"}, "tags": ["t"]})
    assert got == Outer("x", Inner(0.0, "b"), ("t",))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "extra": 1}, r"unknown key\(s\) extra"),
        ({"name": 3}, r"config\.name: expected str"),
        ({"name": "x", "inner": {"ratio": "high"}}, r"inner\.ratio: expected a number"),
        ({"name": "x", "inner": {"ratio": 1.5}}, r"inner: ratio must be in \[0, 1\)"),
        ({"name": "x", "inner": {"mode": "c"}}, r"inner\.mode: 'c' is not one of"),
        ({"name": "x", "tags": "t"}, r"tags: expected a list"),
        ({}, r"missing required key\(s\) name"),
    ],
)
def test_rejects_bad_configs(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("name = ")
    with pytest.raises(ConfigError, match=r"c\.toml: not valid TOML"):
        load_toml(p, Outer)
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "none.toml", Outer)


def test_python_310_reads_toml_with_tomli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Python 3.10 has no tomllib: edge_llm.config must take the tomli branch (a conditional
    dependency in pyproject) and parse, and refuse bad TOML, the same way."""
    import importlib
    import sys

    tomli = pytest.importorskip("tomli")
    import edge_llm.config as config

    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # importing tomllib now fails, as on 3.10
    try:
        reloaded = importlib.reload(config)
        assert reloaded.tomllib is tomli
        path = tmp_path / "c.toml"
        path.write_text('name = "x"\n[inner]\nratio = 0.5\n')
        assert reloaded.load_toml(path, Outer) == Outer(name="x", inner=Inner(ratio=0.5))
        path.write_text("name = \n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            reloaded.load_toml(path, Outer)
    finally:
        monkeypatch.undo()
        importlib.reload(config)
