"""fuzz_serve and faults run end to end on the tiny bundle, at a size the suite can afford."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import faults, fuzz_serve

needs_broker = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")


@needs_broker
def test_fuzz_serve_one_documented_final_per_message(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "fuzz"
    got = fuzz_serve.main(["--bundle", str(tiny_bundle), "--count", "48", "--out", str(out)])
    assert got["server_alive"] and got["valid_after"]["socket"] is True
    sock = got["transports"]["socket"]
    assert sock["total"]["sent"] == 48 and sock["orphan_finals"] == 0
    for name in ("missing", "duplicates", "undocumented", "wrong_id"):
        assert sock["total"].get(name, 0) == 0, (name, sock["families"])
    mqtt = got["transports"]["mqtt"]["families"]
    # bad_reply_to is the harden-mqtt branch's part (topic validation); every other family with a
    # Response Topic must be answered exactly once with its documented code.
    for family, c in mqtt.items():
        if family != "bad_reply_to":
            assert c["sent"] == 6 and c.get("missing", 0) == c.get("duplicates", 0) == 0, (family, c)
            assert c.get("undocumented", 0) == 0, (family, c)
    assert "| socket | **all** | 48 | 0 | 0 | 0 | 0 |" in out.with_suffix(".md").read_text()


@needs_broker
def test_faults_trial_loses_nothing_through_kills(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "faults"
    got = faults.main(["--bundle", str(tiny_bundle), "--requests", "24", "--clients", "4",
                       "--max-tokens", "2", "--timeout", "120", "--out", str(out)])  # fmt: skip
    events = [e["event"] for e in got["events"]]
    assert events[:4] == ["broker killed (SIGKILL)", "broker restarted", "server killed (SIGKILL)",
                          "server restarted"]  # fmt: skip
    assert got["requests_lost"] == 0 and got["app_duplicates"] == 0 and got["app_wrong_id"] == 0
    assert "requests lost | 0" in out.with_suffix(".md").read_text()
