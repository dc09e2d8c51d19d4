"""Where the benchmark scripts put their figures: `OUT.json` (everything) and `OUT.md` (a table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.evaluate import jsonable


def write_results(out: Path, doc: dict[str, Any], markdown: list[str]) -> None:
    """Write `doc` as OUT.json and the Markdown lines as OUT.md (parent folders made), and say so."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {out}.json and {out}.md")
