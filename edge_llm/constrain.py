"""Structured output, the decoding side: JSON enforced token by token with llguidance.

In: a `ResponseFormat` (edge_llm/structured.py) and the bundle's `tokenizer.json`. Out: per
generating row a `Constraint`: `allowed()` is the boolean mask of tokens that keep the output a
prefix of a valid answer (the engine applies it to that row's logits before sampling),
`consume(token)` follows the chosen token, `complete` says the grammar has ended.

llguidance (extra `structured`) compiles a JSON schema into a grammar over the tokenizer's own
tokens. It is imported only when a request asks for JSON, so the base install keeps its four
dependencies; without it such a request is `bad_request` naming the extra.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_llm.errors import ConstraintError, RequestError
from edge_llm.structured import ResponseFormat

EXTRA = "structured"
INSTALL_HINT = f"pip install 'edge-llm[{EXTRA}]'"
# Whitespace between JSON tokens: at most 8 blanks at a time. llguidance's default (any run of
# blanks) let the tiny random test model loop on blanks until max_tokens; a little is kept so a
# model may write `{"a": 1}` or indent as it learned to. (Fixed separators such as ": " with no
# free whitespace tripped a llguidance 1.9.1 bug: after the token `":` its mask allowed `:`, the
# same matcher then refused it.)
_COMPILE = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,8}"}


def _import_llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # the bitmask helpers, an attribute of the package once imported
    except ImportError:
        raise RequestError(
            f"response_format json_object/json_schema needs the '{EXTRA}' extra (llguidance), which"
            f" this server does not have: {INSTALL_HINT}"
        ) from None
    return llguidance


def require() -> None:
    """Raise RequestError (naming the extra) when constrained decoding is not installed."""
    _import_llguidance()


class Constraint:
    """One generating row's matcher: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, matcher: Any, vocab: int, llg_numpy: Any) -> None:
        self.matcher = matcher
        self.vocab = vocab
        self._np = llg_numpy
        self._bits = llg_numpy.allocate_token_bitmask(1, vocab)

    def allowed(self) -> np.ndarray:
        """Boolean [vocab]: the tokens that keep the output a prefix of a valid answer."""
        self._np.fill_next_token_bitmask(self.matcher, self._bits)
        self._check()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def complete(self) -> bool:
        """The grammar is finished: nothing but end-of-sequence may follow."""
        return bool(self.matcher.is_stopped())

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()}")


class Grammars:
    """Per engine: llguidance's view of the bundle's tokenizer (built once, on the first JSON
    request: ~1.2 s for SmolLM2's 49k tokens, measured here) and recently compiled schemas."""

    def __init__(self, tokenizer_json: str, vocab: int, eos_ids: Sequence[int], cache: int = 32) -> None:
        self._llg = _import_llguidance()
        self.vocab = vocab
        self._tokenizer = self._llg.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=list(eos_ids))
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # schema text -> a fresh matcher
        self._lock = threading.Lock()
        self._cache = cache

    def constraint(self, fmt: ResponseFormat) -> Constraint:
        """A new matcher for `fmt`; RequestError when the schema cannot be compiled."""
        with self._lock:
            template = self._compiled.get(fmt.schema)
            if template is not None:
                self._compiled.move_to_end(fmt.schema)
        if template is None:
            template = self._compile(fmt.schema)
            with self._lock:
                self._compiled[fmt.schema] = template
                while len(self._compiled) > self._cache:
                    self._compiled.popitem(last=False)
        return Constraint(template.deep_copy(), self.vocab, self._llg.numpy)

    def _compile(self, schema: str) -> Any:
        llg = self._llg
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPILE)
        except ValueError as exc:
            raise RequestError(f"response_format: not a usable JSON schema: {exc}") from None
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():  # unknown types, unsupported keywords, over the parser's limits
            raise RequestError(f"response_format: the JSON schema cannot be enforced: {matcher.get_error()}")
        return matcher
