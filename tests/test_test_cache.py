"""tests/conftest.py keeps every test run out of the user's cache and leaves no folder behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "EDGE_LLM_CONFTEST_PROBE"


@pytest.mark.skipif(not os.environ.get(PROBE), reason="run by test_session_cache_is_private_and_removed")
def test_probe_writes_into_the_session_cache() -> None:
    from edge_llm.paths import cache_dir

    cache = cache_dir()
    assert cache != Path(os.environ[PROBE])  # the user's EDGE_LLM_CACHE was replaced
    (cache / "stages").mkdir(parents=True)
    (cache / "stages" / "written-by-a-test").write_text("x")


def test_session_cache_is_private_and_removed(tmp_path: Path) -> None:
    user_cache, tmp = tmp_path / "user-cache", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "EDGE_LLM_CACHE": str(user_cache), PROBE: str(user_cache), "TMPDIR": str(tmp)}
    env.pop("EDGE_LLM_TEST_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{PROBE_TEST}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert not user_cache.exists()
    assert not list(tmp.glob("edge-llm-test-cache-*"))


PROBE_TEST = test_probe_writes_into_the_session_cache.__name__
