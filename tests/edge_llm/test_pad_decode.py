"""`[runtime] pad_decode`: one-token forwards run as two, so decode takes the kernel path a
speculative verify takes and greedy speculation equals plain decoding bit for bit (issue 17).

Cause, measured on SmolLM2 int8 (benchmarks/README.md): GroupQueryAttention's output for the
first new token differs in the last bit between a 1-token and a multi-token forward, and
MatMulNBits' int8 activations (accuracy_level 4) amplify that to logit gaps of ~0.75.
Bundles exported with `[fuse] pad_query_row` pad inside the graph instead (test_pad_query_row.py);
pad_decode is for the bundles exported without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from benchmarks.exact_decode import decode_verify_gap, greedy_decode
from edge_llm import speculate
from edge_llm.board import RunnerOptions
from edge_llm.engine import Engine
from edge_llm.sampling import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def padded(tiny_fused_int8: Path) -> Engine:
    return Engine.load(tiny_fused_int8, RunnerOptions(threads=1, speculation="off", pad_decode=True))


def test_padded_decode_gives_the_verify_forwards_logits_bit_for_bit(padded: Engine) -> None:
    ids = padded.encode_request(prompt=PROMPT)
    slot = greedy_decode(padded, ids, 14)[0]
    assert int(slot.cache.lengths[0]) == len(ids) + 14  # the dummy positions were cut off
    assert decode_verify_gap(padded) == 0.0


def test_unpadded_decode_takes_another_kernel_path(tiny_fused_int8: Path, padded: Engine) -> None:
    """Why pad_decode exists: on the int8 graph a 1-token forward's logits are not a 2-token
    forward's first row (if a future onnxruntime makes them equal, pad_decode is not needed)."""
    plain = Engine.load(tiny_fused_int8, RunnerOptions(threads=1, speculation="off"))
    ids = plain.encode_request(prompt=PROMPT)
    rows = greedy_decode(padded, ids, 6)[2]
    rows_1 = greedy_decode(plain, ids, 6)[2]
    assert max(float(np.abs(a - b).max()) for a, b in zip(rows, rows_1, strict=True)) > 0


def test_greedy_speculation_equals_padded_plain_decoding(
    tiny_fused_int8: Path, padded: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = Engine.load(
        tiny_fused_int8, RunnerOptions(threads=1, speculation="lookup", prompt_lookup=4, pad_decode=True)
    )
    assert_lookup_speculation_keeps_plain_tokens(padded, spec, monkeypatch)


def assert_lookup_speculation_keeps_plain_tokens(
    plain: Engine, spec: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy prompt-lookup speculation on `spec` gives `plain`'s 48 tokens, token for token,
    with drafts from that reference, every third one wrong (verifies keep 0..k tokens)."""
    ids = plain.encode_request(prompt=PROMPT)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    ref = list(plain.complete(ids, params).token_ids)
    monkeypatch.setattr(speculate, "lookup_draft", drafts_from(ref, len(ids)))
    out = spec.complete(ids, params)
    assert list(out.token_ids) == ref
    assert out.usage.draft_verifies > 0 and out.usage.accepted_draft_tokens > 0


def drafts_from(ref: list[int], prompt_len: int) -> Callable[..., list[int]]:
    """A stand-in for `speculate.lookup_draft` that drafts the reference tokens `ref` generated
    after a prompt of `prompt_len`, every third one wrong (verifies keep 0..k tokens)."""
    calls = [0]

    def draft(context: list[int], k: int, min_ngram: int = 2) -> list[int]:
        start = len(context) - prompt_len
        out = []
        for pos in range(start, min(start + k, len(ref))):
            calls[0] += 1
            out.append(ref[pos] if calls[0] % 3 else (ref[pos] + 1) % 384)
        return out

    return draft
