"""Streaming never splits a UTF-8 character; chat messages go through the model's template."""

from __future__ import annotations

from pathlib import Path

from edge_llm.bundle import load_bundle
from edge_llm.tokenizer import StreamDecoder, Tokenizer

MULTIBYTE = "Grüße aus München! 日本語のテキスト。 Emoji: 🙂🚀 café naïve"


def test_stream_decoder_never_splits_multibyte(tiny_bundle: Path) -> None:
    tok = Tokenizer(load_bundle(tiny_bundle))
    ids = tok.encode(MULTIBYTE)
    # Byte-level BPE on this text must produce tokens that hold partial characters, or the
    # test would prove nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE


def test_chat_template_renders_roles(tiny_bundle: Path) -> None:
    tok = Tokenizer(load_bundle(tiny_bundle))
    text = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 2  # special tokens are single ids, not spelled out


def test_a_chat_prompt_survives_a_round_trip_through_text(tiny_bundle: Path) -> None:
    tok = Tokenizer(load_bundle(tiny_bundle))
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Write a story."}]))
    assert tok.encode(tok.decode(ids, skip_special=False)) == ids
    assert tok.encode(tok.decode(ids)) != ids  # the default drops the markers: shown text, not prompts
