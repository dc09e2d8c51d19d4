"""Text <-> token ids for the runtime: `tokenizers` plus the bundle's chat format.

In: the bundle's `tokenizer.json` and `TokenizerSpec`. Out: `encode`, `render_chat` (the bundle's
plain `chat_format`, or for bundles without one the model's Jinja template: `edge_llm.chat`) and
`StreamDecoder`, which turns a growing list of ids into text deltas that never end inside a
multibyte UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from edge_llm.bundle import Bundle
from edge_llm.chat import ROLES, ChatFormat, Render, jinja_renderer
from edge_llm.errors import BundleError, RequestError

_REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, bundle: Bundle) -> None:
        self.spec = bundle.tokenizer
        try:
            self._tok = HFTokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"{bundle.tokenizer_path}: cannot load tokenizer: {exc}") from None
        self._render: Render | None = None
        if self.spec.chat_format is not None:
            self._render = ChatFormat.from_dict(self.spec.chat_format).render
        elif self.spec.chat_template:
            self._render = jinja_renderer(self.spec.chat_template, *self.special_texts())

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.spec.eos_ids

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.spec.add_bos and self.spec.bos_id is not None:
            ids = [self.spec.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; with skip_special=False markers such as <|im_start|> stay, so a prompt
        survives a round trip through text (encode parses them back)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's template (checked: role and string content)."""
        check_messages(messages)
        if self._render is None:
            # A base model without a template: plain "role: content" lines are the honest fallback.
            body = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return body + ("assistant: " if add_generation_prompt else "")
        return self._render(messages, add_generation_prompt)

    def special_texts(self) -> tuple[str, str]:
        """(bos_token, eos_token) as a template sees them."""
        bos = self.token_text(self.spec.bos_id) if self.spec.bos_id is not None else None
        eos = self.token_text(self.spec.eos_ids[0]) if self.spec.eos_ids else None
        return bos or "", eos or ""


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list | tuple) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise RequestError(f"messages[{i}] must be an object with role and content only")
        if m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string")


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only complete text.

    Decoding token by token breaks both multibyte characters (a byte-level BPE token can hold
    half of one) and leading-space handling, so we re-decode a short window and emit the
    difference, holding back while the window ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids already turned into emitted text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if new_text.endswith(_REPLACEMENT) or len(new_text) <= len(prefix_text):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :].rstrip(_REPLACEMENT)
