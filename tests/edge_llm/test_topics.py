"""MQTT topic rules (edge_llm.topics) and the `[mqtt]` options that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_llm.board import MqttConfig, load_board
from edge_llm.errors import ConfigError
from edge_llm.topics import MAX_TOPIC_BYTES, reply_topic_problem, topic_problem


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        ("a\x00b", "U+0000"),
        ("a\x01b", "U+0001"),
        ("a\x1fb", "U+001F"),
        ("a\x7fb", "U+007F"),
        ("a\x9fb", "U+009F"),
        ("a\ufdd0b", "U+FDD0"),
        ("a\U0010ffffb", "U+10FFFF"),
        ("a\ud800b", "surrogate"),
        ("a/+/b", "wildcards"),
        ("a/#", "wildcards"),
        ("é" * (MAX_TOPIC_BYTES // 2 + 1), "bytes"),
    ],
)
def test_topics_mosquitto_refuses_are_refused(topic: object, needle: str) -> None:
    problem = topic_problem(topic, "reply_to")
    assert problem is not None and needle in problem and problem.startswith("reply_to")


@pytest.mark.parametrize(
    "topic", ["a", "a/b/c", "/x", "x/", "unicode/ünï/😀", "a\xa0b", "é" * (MAX_TOPIC_BYTES // 2)]
)
def test_good_topics_pass(topic: str) -> None:
    assert topic_problem(topic) is None


def test_wildcards_allowed_in_filters_only() -> None:
    assert topic_problem("a/+/#", wildcards=True) is None
    assert topic_problem("a/+/\x01", wildcards=True) is not None


@pytest.mark.parametrize(
    ("topic", "allowed", "ok"),
    [
        ("my/replies", (), True),
        ("edge-llm/reply/client-1", (), True),  # the SDK's default reply topics
        ("edge-llm-other/x", (), True),  # level-wise: not under edge-llm/
        ("edge-llm/dev1/generate", (), False),
        ("edge-llm/dev1/status", (), False),
        ("edge-llm/fleet/cancel", (), False),
        ("edge-llm", (), False),
        ("$SYS/broker", (), False),
        ("$share/g/x", (), False),
        ("apps/a/me", ("apps/a",), True),
        ("apps/a", ("apps/a/",), True),
        ("apps/ab", ("apps/a",), False),
        ("edge-llm/reply/c", ("apps/a",), False),
        ("edge-llm/dev1/status", ("edge-llm",), False),  # device topics stay refused
    ],
)
def test_reply_topic_allow_list(topic: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert (reply_topic_problem(topic, "edge-llm", allowed) is None) is ok


def test_mqtt_config_checks_its_topic_parts(tmp_path: Path) -> None:
    for bad in ({"device": "a/b"}, {"device": "d\x01"}, {"device": "reply"}, {"fleet_group": "g+"}):
        with pytest.raises(ValueError):
            MqttConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\$-topic"):
        MqttConfig(reply_prefixes=("$SYS",))
    config = tmp_path / "board.toml"
    config.write_text('[mqtt]\nhost = "h"\ndevice = "d"\nreply_prefixes = ["apps/a", "apps/b"]\n')
    assert load_board(config).mqtt.reply_prefixes == ("apps/a", "apps/b")
    config.write_text('[mqtt]\nhost = "h"\ndevice = "d"\nreply_prefixes = "apps/a"\n')
    with pytest.raises(ConfigError, match="reply_prefixes"):
        load_board(config)
