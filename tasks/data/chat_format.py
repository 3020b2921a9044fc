"""The conversation format (REFERENCE.md "SFT chat template"), held against the tokenizer's own template.

A conversation is rendered turn by turn, with no separator between turns::

    <|im_system|>system<|im_middle|>...<|im_end|><|im_user|>user<|im_middle|>...<|im_end|>
    <|im_assistant|>assistant<|im_middle|>...<|im_end|>

and an image inside a turn is ``<|media_start|>image<|media_content|><|media_pad|>...<|media_end|>`` (the
tokenize step expands the pad to the image's token count). ``DocTokenizer`` builds token ids and loss masks
from these pieces; this module only decides the pieces.

When the tokenizer carries a chat template (the public checkpoints do: ``tokenizer_config.json``
``chat_template``), ``ChatFormat`` renders probe conversations with it (Jinja, sandboxed, as transformers
runs it) and requires the format above to produce the same string, byte for byte, so training data is
exactly what the public template gives at inference. A template that injects a default system turn when
the conversation has none (the public Kimi-VL template adds "You are a helpful assistant") is detected from
its output and reproduced; a template this format cannot reproduce is a ``TokenizerFormatError`` naming the
first differing character. The project's own tokenizer has no template and adds no default turn.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any

from tasks.data.schema import IMAGE_TOKEN, VIDEO_TOKEN
from tasks.data.special_tokens import (
    IM_END,
    IM_MIDDLE,
    IM_SYSTEM,
    MEDIA_CONTENT,
    MEDIA_END,
    MEDIA_PAD,
    MEDIA_START,
    ROLE_TOKENS,
    THINK_END,
    THINK_START,
)
from tasks.data.text_tokenizer import TextTokenizer, TokenizerFormatError

_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
_WORD = {IMAGE_TOKEN: "image", VIDEO_TOKEN: "video"}
_PROBE_USER = "Probe question 7: what is shown?"
_DEFAULT_SYSTEM_RE = re.compile(
    re.escape(IM_SYSTEM + "system" + IM_MIDDLE) + "(.*)" + re.escape(IM_END), re.DOTALL
)
# conversations the template and this format must render identically (system turn or not, several turns,
# images, think markers); videos are this project's extension (one block per frame) and not probed
_PROBES: tuple[list[dict[str, str]], ...] = (
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "<image>\nWhat colour is the ball?"},
        {"role": "assistant", "content": f"{THINK_START} look at it {THINK_END}Red."},
    ],
    [
        {"role": "user", "content": "Two: <image> and <image>. Same?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Different shapes.\n"},
    ],
    [{"role": "user", "content": _PROBE_USER}],
)


def media_block(word: str = "image", pads: int = 1) -> str:
    return MEDIA_START + word + MEDIA_CONTENT + MEDIA_PAD * pads + MEDIA_END


def header(role: str) -> str:
    return ROLE_TOKENS[role] + role + IM_MIDDLE


def generation_prompt() -> str:
    return header("assistant")


class ChatFormat:
    """The pieces of a conversation for one tokenizer (the default system turn, if its template has one)."""

    def __init__(self, tok: TextTokenizer) -> None:
        self.tok = tok
        self.default_system: str | None = None
        if tok.chat_template is not None:
            self.default_system = self._detect_default_system()
            self.verify()

    def turns(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages as rendered: the default system turn first when the template adds one."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.default_system}, *messages]
        return list(messages)

    def render_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """This format as a string (one pad per image): what the tokenize step encodes."""
        out = []
        for m in self.turns(messages):
            content = _PLACEHOLDER_RE.sub(lambda p: media_block(_WORD[p.group(0)]), m["content"])
            out.append(header(m["role"]) + content + IM_END)
        return "".join(out) + (generation_prompt() if add_generation_prompt else "")

    # ------------------------------------------------------------------------------------- template
    @cached_property
    def _template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.tok.chat_template)
        except TemplateError as e:
            raise TokenizerFormatError(f"{self.tok.directory}: chat_template does not compile: {e}") from None

    def render_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The tokenizer's own template on ``messages`` (placeholders become ``{"type": "image"}`` parts)."""
        from jinja2.exceptions import TemplateError

        conv = [{"role": m["role"], "content": _template_content(m["content"])} for m in messages]
        cfg = self.tok.config
        try:
            return self._template.render(
                messages=conv,
                add_generation_prompt=add_generation_prompt,
                bos_token=_name(cfg.get("bos_token")),
                eos_token=_name(cfg.get("eos_token")),
            )
        except TemplateError as e:
            raise TokenizerFormatError(f"{self.tok.directory}: chat_template failed to render: {e}") from None

    def _detect_default_system(self) -> str | None:
        probe = [{"role": "user", "content": _PROBE_USER}]
        theirs = self.render_template(probe)
        ours = header("user") + _PROBE_USER + IM_END
        if theirs == ours or not theirs.endswith(ours):
            return None  # no default turn (or a template verify() will reject with the difference)
        m = _DEFAULT_SYSTEM_RE.fullmatch(theirs[: -len(ours)])
        return m.group(1) if m else None

    def verify(self) -> None:
        """Raise ``TokenizerFormatError`` unless the template and this format render every probe alike."""
        for probe in _PROBES:
            for gen in (False, True):
                theirs = self.render_template(probe, add_generation_prompt=gen)
                ours = self.render_text(probe, add_generation_prompt=gen)
                if theirs != ours:
                    i = next((k for k, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), None)
                    i = min(len(theirs), len(ours)) if i is None else i
                    raise TokenizerFormatError(
                        f"{self.tok.directory}: chat_template renders conversations differently from the "
                        f"Kimi-VL format this project trains on: first difference at character {i}: template "
                        f"{theirs[max(0, i - 30) : i + 30]!r} vs format {ours[max(0, i - 30) : i + 30]!r}"
                    )


def _template_content(content: str) -> str | list[dict[str, str]]:
    if not _PLACEHOLDER_RE.search(content):
        return content
    parts: list[dict[str, str]] = []
    for piece in _PLACEHOLDER_RE.split(content):
        if piece == IMAGE_TOKEN:
            parts.append({"type": "image"})
        elif piece == VIDEO_TOKEN:
            parts.append({"type": "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _name(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


__all__ = ["ChatFormat", "generation_prompt", "header", "media_block"]
