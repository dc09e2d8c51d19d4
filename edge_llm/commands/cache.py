"""`edge-llm cache`: what the export pipeline keeps under the cache folder, and pruning it.

Lists each stage output (`stages/<stage>-<key>`) with its size and last use, least recently used
first. `--max-gb N` removes least recently used complete outputs until the stages fit N GB (what
every recipe run does at its end with EDGE_LLM_CACHE_MAX_GB); `--clear` removes them all, and with
`--partial` also the unfinished ones (an interrupted distillation's checkpoint among them).
Neither touches what an export running now has used since it started.
It also lists the bundles (`bundles/`, the default one marked) and the downloaded models
(`models/`), which it never removes: they are not rebuilt for free.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list the cache (bundles, models, stage outputs); prune stage outputs")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--max-gb", type=float, help="remove least recently used outputs until they fit N GB")
    act.add_argument("--clear", action="store_true", help="remove every complete stage output")
    p.add_argument("--partial", action="store_true", help="with --clear: also unfinished (.partial) ones")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edge_llm.errors import ConfigError
    from export import cache

    if args.partial and not args.clear:
        raise ConfigError("--partial goes with --clear")
    if args.max_gb is not None and args.max_gb < 0:
        raise ConfigError(f"--max-gb {args.max_gb}: must be >= 0")
    removed: list[cache.StageEntry] = []
    if args.max_gb is not None:
        removed = cache.evict(int(args.max_gb * 1024**3))
    elif args.clear:
        removed = cache.evict(-1, partial=args.partial)  # spares what running exports use
        if runs := len(cache.live_run_starts()):
            print(f"{runs} export run(s) in progress: what they use was kept")
    entries = cache.stage_entries()
    limit = cache.max_bytes()
    kept = {name: _folder_rows(cache.cache_root() / name) for name in ("bundles", "models")}
    if args.json:
        print(
            json.dumps(
                {
                    "root": str(cache.cache_root()),
                    **kept,
                    "stages": [_row(e) for e in entries],
                    "removed": [_row(e) for e in removed],
                    "total_bytes": sum(e.bytes for e in entries),
                    "max_bytes": limit,
                }
            )
        )
        return 0
    now = time.time()
    for e in removed:
        print(f"removed {e.path.name} ({e.bytes / 2**20:.0f} MiB)")
    print(f"{cache.cache_root() / 'stages'}:")
    for e in entries:
        state = "" if e.complete else "  (partial: kept unless --clear --partial)"
        print(f"  {e.bytes / 2**20:8.0f} MiB  used {_ago(now - e.last_used):>9}  {e.path.name}{state}")
    total = sum(e.bytes for e in entries) / 2**30
    bound = "no bound" if limit is None else f"bound {limit / 2**30:.1f} GB (EDGE_LLM_CACHE_MAX_GB)"
    print(f"  {len(entries)} outputs, {total:.2f} GB; {bound}")
    for name, rows in kept.items():
        print(f"{cache.cache_root() / name}:  (never pruned)")
        for row in rows:
            shown = f"{row['name']} -> {row['link']}" if row.get("link") else row["name"]
            print(f"  {row['bytes'] / 2**20:8.0f} MiB  {shown}")
        if not rows:
            print("  (none)")
    return 0


def _folder_rows(root: Path) -> list[dict[str, Any]]:
    """Each entry of `root` with its size; a link (bundles/default) with its target instead, so
    the default bundle is not counted twice."""
    rows: list[dict[str, Any]] = []
    if not root.is_dir():
        return rows
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink():
            rows.append({"name": path.name, "bytes": 0, "link": str(path.readlink())})
            continue
        size = path.stat().st_size if path.is_file() else _tree_bytes(path)
        rows.append({"name": path.name, "bytes": size})
    return rows


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _row(e: Any) -> dict[str, Any]:
    return {"name": e.path.name, "bytes": e.bytes, "last_used": e.last_used, "complete": e.complete}


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"
