"""Where edge-llm keeps things on disk, and which bundle a command means when given none.

The cache folder is `~/.cache/edge-llm`, or `$EDGE_LLM_CACHE`. Bundles that `edge-llm export`
writes without `--out` live under its `bundles/` folder, named by their recipe's content, and the
last one exported that way is linked as `bundles/default`: the bundle every command uses when
`--bundle` is omitted. A stable name lets the README's commands run as written, while the real
folder names still tell two recipes' bundles apart.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_llm.errors import BundleError

DEFAULT_LINK = "default"


def cache_dir() -> Path:
    """The cache folder (not created: read-only commands must not leave one behind)."""
    return Path(os.environ.get("EDGE_LLM_CACHE") or Path.home() / ".cache" / "edge-llm")


def bundles_dir() -> Path:
    return cache_dir() / "bundles"


def default_bundle() -> Path:
    return bundles_dir() / DEFAULT_LINK


def resolve_bundle(given: str | Path | None) -> Path:
    """The bundle folder a command was pointed at (`None`: the default bundle), with a clear
    error for the two ways a new user gets it wrong: a file instead of the folder, or no default
    bundle yet."""
    if given is None:
        path = default_bundle()
        if not (path / "bundle.json").is_file():
            raise BundleError(
                f"no --bundle given and no default bundle at {path}: run `edge-llm export` "
                "(writes the default SmolLM2 INT8 bundle there) or pass --bundle DIR"
            )
        return path
    path = Path(given).expanduser()
    if path.is_file():
        raise BundleError(
            f"{path}: is a file; --bundle expects the bundle folder (the one holding bundle.json)"
        )
    return path


def link_default(bundle: Path) -> Path:
    """Point `bundles/default` at `bundle` (atomically: a command starting meanwhile sees the old
    or the new bundle, never no link). A relative link when the bundle sits under `bundles/`, so
    the cache folder can be moved or copied to a board as a whole."""
    link = default_bundle()
    link.parent.mkdir(parents=True, exist_ok=True)
    bundle = bundle.resolve()
    if link.is_dir() and not link.is_symlink():  # someone exported with --out .../bundles/default
        if link.resolve() == bundle:
            return link
        raise BundleError(f"{link}: a folder, not the link to the default bundle; move it away first")
    try:
        target: Path | str = bundle.relative_to(link.parent.resolve())
    except ValueError:
        target = bundle
    tmp = link.with_name(f".{DEFAULT_LINK}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)
    return link
