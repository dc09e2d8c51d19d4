"""Check a board package against its `manifest.json` (standard library only).

`edge-llm pack` copies this file into every package as `verify.py`, and the package's
`install.sh` runs it with the board's own python3 before anything is installed — edge-llm is not
installed yet at that point, hence no imports beyond the standard library. Pack and the tests
call the same function, so there is one definition of a valid package.

Refused: a file whose size or sha256 differs from the manifest, a listed file that is missing,
a file the manifest does not list (a stray wheel would be installed), and — unless
`files_only` — a package built for another CPU architecture or Python version than this one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
# platform.machine() spellings of the architectures packages are built for
_MACHINE = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class PackageError(Exception):
    """The package is damaged, incomplete or not for this board."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def this_machine() -> str:
    machine = platform.machine().lower()
    return _MACHINE.get(machine, machine)


def verify(root: Path, files_only: bool = False) -> dict:
    """Return the manifest of the package at `root` if every check passes, else raise."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; this is not an edge-llm board package") from None
    except ValueError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: unknown manifest format {manifest.get('format')!r} (expected {FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise PackageError(f"{path}: lists no files")
    problems = []
    for name, entry in sorted(files.items()):
        file = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: not a path inside the package")
        elif not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{name}: {file.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif sha256_file(file) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (damaged or altered)")
    for file in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        name = file.relative_to(root).as_posix()
        if name != MANIFEST and name not in files:
            problems.append(f"{name}: not in the manifest")
    if problems:
        raise PackageError("package verification failed:\n  " + "\n  ".join(problems))
    if not files_only:
        want_arch, want_py = manifest.get("arch"), manifest.get("python")
        have_py = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if this_machine() != want_arch:
            raise PackageError(f"this package is for {want_arch}; this machine is {this_machine()}")
        if have_py != want_py:
            raise PackageError(
                f"this package's wheels are for Python {want_py}; {sys.executable} is Python {have_py}"
                " (set PYTHON=/path/to/python" + str(want_py) + ")"
            )
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    files_only = "--files-only" in args
    rest = [a for a in args if a != "--files-only"]
    root = Path(rest[0]) if rest else Path(__file__).resolve().parent
    try:
        manifest = verify(root, files_only=files_only)
    except PackageError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return 1
    target = f"{manifest['arch']}, Python {manifest['python']}"
    print(f"verify: {len(manifest['files'])} files match the manifest ({target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
