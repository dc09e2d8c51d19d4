"""MQTT topic rules, shared by the protocol parser, the MQTT transport, the board config and the SDK.

A topic the broker cannot accept must be refused before it reaches paho: Mosquitto answers a
PUBLISH with a malformed topic by closing the connection, and paho sends every unacknowledged
QoS 1 publish again after reconnecting, so one bad reply topic would take a device off MQTT
for good (issue 11, item 3). The rules are those of MQTT 3.1.1/5 §1.5.4 as Mosquitto enforces
them (`mosquitto_validate_utf8`, `mosquitto_pub_topic_check`): well-formed UTF-8 (no lone
surrogates), at most 65,535 bytes, no U+0000, no control characters U+0001–U+001F and
U+007F–U+009F, no Unicode non-characters (U+FDD0–U+FDEF, U+xFFFE/U+xFFFF), and no `+`/`#` in a
topic that is published to.

No imports beyond the standard library: the client SDK and the parser use this module.
"""

from __future__ import annotations

import re

MAX_TOPIC_BYTES = 65_535
REPLY_LEVEL = "reply"  # `<prefix>/reply/...`: the SDK's reply topics, the only replies under the prefix

_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17)
)
_BAD_CHAR = re.compile(f"[\x00-\x1f\x7f-\x9f{_NONCHARACTERS}]")


def topic_problem(topic: object, what: str = "topic", *, wildcards: bool = False) -> str | None:
    """Why `topic` is not a topic name the broker accepts (`what` names it in the message), or
    None when it is fine. `wildcards=True` checks a subscription filter's characters instead."""
    if not isinstance(topic, str) or not topic:
        return f"{what} must be a non-empty string"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} is not well-formed UTF-8 (it contains a lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"{what} is {size} bytes; MQTT allows at most {MAX_TOPIC_BYTES}"
    bad = _BAD_CHAR.search(topic)
    if bad is not None:
        return f"{what} contains U+{ord(bad.group()):04X}, which MQTT brokers refuse in a topic"
    if not wildcards and ("+" in topic or "#" in topic):
        return f"{what} must not contain the wildcards + or #"
    return None


def level_problem(value: str, what: str) -> str | None:
    """Why `value` cannot be one topic level (a device id, a group, the prefix), or None."""
    if any(c in value for c in "/+#"):
        return f"{what} must not contain /, + or #"
    return topic_problem(value, what) if value else None


def under(topic: str, prefix: str) -> bool:
    """`topic` is `prefix` itself or below it, level-wise (`app` covers `app/x`, not `apple`)."""
    prefix = prefix.rstrip("/")
    return topic == prefix or topic.startswith(prefix + "/")


def reply_topic_problem(topic: object, topic_prefix: str, allowed: tuple[str, ...] = ()) -> str | None:
    """Why a device must not publish a reply to `topic`, or None.

    Never to a `$` topic (broker internals, shared subscriptions) and never to a device topic:
    anything under `<topic_prefix>/` except `<topic_prefix>/reply/...` (a request must not make a
    device publish into another device's `generate`, its own `status` or `cancel`). With
    `allowed` prefixes (`[mqtt] reply_prefixes`), the topic must also lie under one of them."""
    problem = topic_problem(topic, "reply topic")
    if problem is not None:
        return problem
    assert isinstance(topic, str)
    if topic.startswith("$"):
        return f"reply topic {topic!r} is a $-topic"
    if under(topic, topic_prefix) and not under(topic, f"{topic_prefix}/{REPLY_LEVEL}"):
        return (
            f"reply topic {topic!r} is a device topic ({topic_prefix}/…, other than {topic_prefix}/reply/…)"
        )
    if allowed and not any(under(topic, p) for p in allowed):
        return f"reply topic {topic!r} is not under an allowed reply prefix ({', '.join(allowed)})"
    return None
