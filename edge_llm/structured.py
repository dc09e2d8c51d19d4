"""Structured output, the request side: the `response_format` field.

In: a request's `response_format` object (`{"type": "text" | "json_object" | "json_schema", ...}`,
OpenAI's shape). Out: a `ResponseFormat` value, or None for plain text. This module imports
nothing but the standard library: the protocol parser and the client SDK use it. Enforcing the
format while decoding is `edge_llm/constrain.py` (llguidance, extra `structured`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_llm.errors import RequestError

_TYPES = ("text", "json_object", "json_schema")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object, like OpenAI's JSON mode


@dataclass(frozen=True)
class ResponseFormat:
    """A JSON response format; plain text is `None` wherever a ResponseFormat is expected."""

    type: str  # "json_object" or "json_schema"
    schema: str = _ANY_OBJECT  # the JSON schema as compact JSON text (hashable, stored as given)
    name: str | None = None
    strict: bool | None = None
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.type == "json_object":
            return {"type": "json_object"}
        spec: dict[str, Any] = {"schema": json.loads(self.schema)}
        for key in ("name", "strict", "description"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        return {"type": "json_schema", "json_schema": spec}


def parse_response_format(
    value: Any, fail: Callable[[str], Exception] = RequestError
) -> ResponseFormat | None:
    """Validate a `response_format` object; `None` for plain text. Raises `fail(message)`."""
    if isinstance(value, ResponseFormat):
        return value
    if not isinstance(value, dict) or value.get("type") not in _TYPES:
        raise fail(f"response_format must be an object with type one of {', '.join(_TYPES)}")
    kind = value["type"]
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(value) - allowed)
    if extra:
        raise fail(f"response_format of type {kind} takes no field(s) {', '.join(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise fail('response_format.json_schema must be {"name": ..., "schema": {...}, "strict": ...}')
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise fail(f"response_format.json_schema: unknown field(s) {', '.join(extra)}")
    name, strict, description = spec.get("name"), spec.get("strict"), spec.get("description")
    if name is not None and not (isinstance(name, str) and _NAME.match(name)):
        raise fail("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'")
    if strict is not None and not isinstance(strict, bool):
        raise fail("response_format.json_schema.strict must be true or false")
    if description is not None and not isinstance(description, str):
        raise fail("response_format.json_schema.description must be a string")
    schema = json.dumps(spec["schema"], ensure_ascii=False, separators=(",", ":"))  # key order kept:
    # the grammar writes the properties in the order the schema lists them
    return ResponseFormat("json_schema", schema, name, strict, description)
