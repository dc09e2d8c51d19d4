"""Chat prompts without a template engine on the board.

In: chat messages (`{role, content}`) and either a bundle's `ChatFormat` (plain strings, written at
export time) or, for bundles without one, the model's Jinja template. Out: the prompt text.

Why: the runtime's hard dependencies are onnxruntime, numpy, tokenizers and paho-mqtt. Most chat
templates (ChatML, Llama 3, Qwen, Phi-3, SmolLM2's) put each message between a fixed prefix and
suffix that depend only on its role, plus fixed text at the start (a default system prompt when
the conversation has none) and a fixed generation prompt. `derive` finds those strings by
rendering probe conversations through the template on the workstation and keeps them only if they
reproduce the template exactly on every probe, including awkward contents and role orders; a
template that does more (alternation checks, trimming, names) gets no format and the runtime
renders it with jinja2, an optional dependency (`pip install edge-llm[templates]`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_llm.errors import BundleError, RequestError

ROLES = ("system", "user", "assistant", "tool")
Render = Callable[[Sequence[dict[str, Any]], bool], str]


@dataclass(frozen=True)
class ChatFormat:
    first_system: tuple[str, str]  # (prefix, suffix) of a system message that opens the chat
    no_system: str  # what opens a chat whose first message is not a system one
    roles: dict[str, tuple[str, str]]  # (prefix, suffix) of every other message, by role
    generation_prompt: str

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        out = []
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if i == 0 and role == "system":
                prefix, suffix = self.first_system
            else:
                if role not in self.roles:
                    raise RequestError(f"messages[{i}].role {role!r}: this model's chat template refuses it")
                prefix, suffix = self.roles[role]
                if i == 0:
                    prefix = self.no_system + prefix
            out += [prefix, content, suffix]
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_system": list(self.first_system),
            "no_system": self.no_system,
            "roles": {r: list(p) for r, p in self.roles.items()},
            "generation_prompt": self.generation_prompt,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> ChatFormat:
        try:
            roles = {str(r): _pair(p) for r, p in raw["roles"].items()}
            fmt = cls(_pair(raw["first_system"]), str(raw["no_system"]), roles, str(raw["generation_prompt"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"tokenizer.chat_format is malformed: {exc!r}") from None
        if set(fmt.roles) - set(ROLES):
            raise BundleError(f"tokenizer.chat_format: unknown roles {sorted(set(fmt.roles) - set(ROLES))}")
        return fmt


def _pair(raw: Any) -> tuple[str, str]:
    if not isinstance(raw, list | tuple) or len(raw) != 2 or not all(isinstance(s, str) for s in raw):
        raise ValueError(f"expected [prefix, suffix] strings, got {raw!r}")
    return raw[0], raw[1]


def jinja_renderer(source: str, bos: str, eos: str) -> Render:
    """The model's own template, sandboxed (needs jinja2: the export extra or `templates`)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BundleError(
            "this bundle's chat template has no plain chat_format and needs jinja2: "
            "pip install 'edge-llm[templates]' (or re-export the bundle)"
        ) from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    template = env.from_string(source)

    def render(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )

    return render


def _raise_template_error(message: str) -> None:
    raise RequestError(f"chat template refused the messages: {message}")


# Contents that a template which trims, escapes or parses its input would change.
_AWKWARD = (" two  spaces \n", "{{ not jinja }} {% raw %}", "\n", "x", "<|im_end|>?")


def derive(render: Render) -> ChatFormat | None:
    """The plain format `render` (a template) follows, or None when no such format reproduces it."""
    c = [f"\u27e6{i}\u27e7" for i in range(4)]  # sentinels no template writes itself

    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    try:
        opened = render([msg("system", c[0])], False)
        first_system = _split(opened, c[0])
        roles = {}
        for role in ROLES:
            try:
                both = render([msg("system", c[0]), msg(role, c[1])], False)
            except RequestError:
                continue  # the template refuses this role: so will the format
            if not both.startswith(opened):
                return None
            roles[role] = _split(both[len(opened) :], c[1])
        if "user" not in roles or first_system is None or any(p is None for p in roles.values()):
            return None
        prefix, suffix = roles["user"]  # type: ignore[misc]
        alone = render([msg("user", c[2])], False)
        if not alone.endswith(prefix + c[2] + suffix):
            return None
        no_system = alone[: len(alone) - len(prefix + c[2] + suffix)]
        generation = render([msg("user", c[2])], True)[len(alone) :]
        fmt = ChatFormat(first_system, no_system, roles, generation)  # type: ignore[arg-type]
    except (RequestError, ValueError, TypeError):
        return None
    return fmt if _reproduces(fmt, render) else None


def _split(text: str, sentinel: str) -> tuple[str, str] | None:
    if text.count(sentinel) != 1:
        return None
    prefix, suffix = text.split(sentinel)
    return prefix, suffix


def _reproduces(fmt: ChatFormat, render: Render) -> bool:
    """Every probe conversation renders identically both ways (or is refused by both)."""
    roles = list(fmt.roles)
    probes: list[list[dict[str, str]]] = []
    for first in ("system", *roles):
        for second in roles:
            for third in roles:
                n = len(probes)
                texts = [_AWKWARD[(n + j) % len(_AWKWARD)] for j in range(3)]
                order = (first, second, third)
                probes.append([{"role": r, "content": t} for r, t in zip(order, texts, strict=True)])
    probes.append([{"role": "user", "content": "hi", "name": "ann"}])
    probes.append([{"role": "system", "content": ""}, {"role": "user", "content": ""}])
    for probe in probes:
        for gen in (False, True):
            try:
                want = render(probe, gen)
            except RequestError:
                return False  # the template enforces something (an order of roles) a format cannot
            if fmt.render(probe, gen) != want:
                return False
    return True
