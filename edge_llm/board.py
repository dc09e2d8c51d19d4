"""Board profiles: one TOML file per kind of board, in `configs/boards/`.

In: a TOML path. Out: a frozen `BoardConfig` — execution providers in order of preference with
their options, runtime threads and limits — and from it the `RunnerOptions` the engine takes.
Unknown keys and wrong types fail with the file and dotted key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_llm.config import load_toml
from edge_llm.providers import ProviderSpec, parse_provider_list
from edge_llm.runner import RunnerOptions


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0
    spin: bool = True
    max_context: int = 0
    max_batch: int = 8

    def __post_init__(self) -> None:
        if self.threads < 0 or self.max_context < 0 or self.max_batch < 1:
            raise ValueError("runtime: threads and max_context must be ≥ 0, max_batch ≥ 1")


@dataclass(frozen=True)
class BoardConfig:
    name: str = "default"
    description: str = ""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    providers: tuple[dict[str, str | int | float | bool], ...] = ({"name": "cpu"},)

    def provider_specs(self) -> tuple[ProviderSpec, ...]:
        return parse_provider_list(self.providers)

    def runner_options(self) -> RunnerOptions:
        r = self.runtime
        return RunnerOptions(
            providers=self.provider_specs(),
            threads=r.threads,
            spin=r.spin,
            max_context=r.max_context,
            max_batch=r.max_batch,
        )


def load_board(path: str | Path | None) -> BoardConfig:
    if path is None:
        return BoardConfig()
    board = load_toml(path, BoardConfig)
    board.provider_specs()  # validate provider names and options now, not at first request
    return board
