"""Text spans the stages read: prune's calibration, distillation's training text, evaluation's
held-out text and the QDQ calibration all take "characters [start, end) of a file, as fractions".

No stage ships a default file: each recipe section that reads text names it (`text = ...`). A
relative path resolves against the current directory first, then against the source checkout's
root (where the recipes' `../shared/data/...` paths point); an absolute path is used as is. Spans
are fractions of the file's characters, so a recipe can hold out evaluation text that training
and calibration never see (`overlaps`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_llm.errors import ExportError

# The checkout this package sits in; recipes under configs/ write paths relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]


def check_span(span: tuple[float, ...], where: str) -> None:
    if len(span) != 2 or not 0.0 <= span[0] < span[1] <= 1.0:
        raise ValueError(f"{where} must be [start, end] fractions with 0 <= start < end <= 1, not {span}")


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two [begin, end) spans of a file share any part."""
    return a[0] < b[1] and b[0] < a[1]


def candidates(path: Path) -> list[Path]:
    """Where a text path may be, in the order `resolve_text` looks."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return [path]
    return [(Path.cwd() / path).resolve(), (REPO_ROOT / path).resolve()]


def resolve_text(path: Path | None, where: str = "text") -> Path:
    """The file a recipe's text path names (see the module docstring); it must exist."""
    if path is None:
        raise ExportError(f'{where}: no text file given (set it in the recipe: text = "PATH")')
    looked = candidates(path)
    for full in looked:
        if full.is_file():
            return full
    raise ExportError(f"{where}: text file {path} not found (looked at {', '.join(map(str, looked))})")


def same_file(a: Path, b: Path) -> bool:
    """Whether two text paths name the same file (as `resolve_text` would find them)."""
    try:
        return resolve_text(a) == resolve_text(b)
    except ExportError:  # a missing file fails later, naming the stage that reads it
        return candidates(a)[0] == candidates(b)[0]


def read_span(
    path: Path | None, span: tuple[float, float], where: str = "text"
) -> tuple[str, dict[str, Any]]:
    """The characters [start, end) of the file given as fractions, and a record of what was read."""
    full = resolve_text(path, where)
    text = full.read_text(encoding="utf-8")
    a, b = round(span[0] * len(text)), round(span[1] * len(text))
    return text[a:b], {"file": str(full), "span": list(span), "chars": [a, b]}


def first_tokens(text: str, encode: Callable[[str], list[int]], count: int) -> list[int]:
    """The first `count` token ids of `text`, tokenizing only as much of it as that takes.

    A prefix is encoded, four times longer each round, until it yields `count` tokens plus a
    margin of 64. Tokenizers split text into words before merging, so cutting the text changes
    only the last word or two: the ids kept are the ones encoding the whole text gives (tested,
    and the default bundle's perplexity is unchanged). A 1,024-token evaluation of a whole file
    then tokenizes ~10 KB, not the file."""
    margin, chars = 64, max(4096, 8 * count)
    while True:
        ids = encode(text[:chars])
        if chars >= len(text) or len(ids) >= count + margin:
            return ids[:count]
        chars *= 4
