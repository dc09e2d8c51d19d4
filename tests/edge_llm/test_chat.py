"""Chat formats: derived from templates only when they reproduce them; rendered without jinja2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm import chat
from edge_llm.bundle import load_bundle
from edge_llm.errors import BundleError, RequestError
from edge_llm.tokenizer import Tokenizer

CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
    " + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ALTERNATING = (  # Llama 2 / Mistral style: refuses two user turns in a row
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + '\\n' }}{% endfor %}"
)
TRIMMING = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
NAMED = (
    "{% for m in messages %}{{ m['role'] }}{% if m.name %}({{ m.name }}){% endif %}: "
    "{{ m['content'] }}\n{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": " spaced \n"},
        {"role": "assistant", "content": "{{ braces }}"},
        {"role": "user", "content": "again"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "assistant", "content": "x"},
        {"role": "system", "content": "y"},
    ],
]


@pytest.mark.parametrize("template", [CHATML_DEFAULT_SYSTEM, LLAMA3])
def test_derived_format_renders_what_the_template_renders(template: str) -> None:
    render = chat.jinja_renderer(template, "<s>", "</s>")
    fmt = chat.derive(render)
    assert fmt is not None and set(fmt.roles) == set(chat.ROLES)
    for conversation in CONVERSATIONS:
        for gen in (False, True):
            assert fmt.render(conversation, gen) == render(conversation, gen)
    again = chat.ChatFormat.from_dict(json.loads(json.dumps(fmt.to_dict())))  # as stored in bundle.json
    assert again == fmt


@pytest.mark.parametrize("template", [ALTERNATING, TRIMMING, NAMED])
def test_templates_that_do_more_than_wrap_messages_get_no_format(template: str) -> None:
    assert chat.derive(chat.jinja_renderer(template, "<s>", "</s>")) is None


def test_format_refuses_roles_it_does_not_have_and_bad_manifests() -> None:
    fmt = chat.ChatFormat(("S:", "\n"), "", {"user": ("U:", "\n")}, "A:")
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert fmt.render(two) == "S:s\nU:u\nA:"
    with pytest.raises(RequestError, match="role 'assistant'"):
        fmt.render([{"role": "assistant", "content": "a"}])
    with pytest.raises(BundleError, match="malformed"):
        chat.ChatFormat.from_dict({"roles": {}})
    with pytest.raises(BundleError, match="unknown roles"):
        chat.ChatFormat.from_dict({**fmt.to_dict(), "roles": {"wizard": ["", ""]}})


def test_exported_bundle_carries_a_format_that_matches_its_template(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.tokenizer.chat_format is not None
    tok = Tokenizer(bundle)
    render = chat.jinja_renderer(bundle.tokenizer.chat_template or "", *tok.special_texts())
    for conversation in CONVERSATIONS:
        assert tok.render_chat(conversation) == render(conversation, True)


def test_runtime_renders_chats_without_jinja2(tiny_bundle: Path, tmp_path: Path) -> None:
    """jinja2 unimportable: a bundle with a chat format works; one without says what to install."""
    code = f"""
import sys, dataclasses
sys.modules["jinja2"] = None  # import jinja2 -> ImportError
from edge_llm.bundle import load_bundle
from edge_llm.errors import BundleError
from edge_llm.tokenizer import Tokenizer
b = load_bundle({str(tiny_bundle)!r})
print(Tokenizer(b).render_chat([{{"role": "user", "content": "hi"}}]).count("hi"))
old = dataclasses.replace(b, tokenizer=dataclasses.replace(b.tokenizer, chat_format=None))
try:
    Tokenizer(old)
except BundleError as exc:
    print("refused:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "1" and "edge-llm[templates]" in lines[1]
