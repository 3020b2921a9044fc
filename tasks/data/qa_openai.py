"""Optional QA generator backed by the user's own OpenAI-compatible chat-completions server.

``OpenAICompatibleGenerator(base_url, model, api_key_env)`` POSTs to ``{base_url}/chat/completions`` with the
standard library only (``urllib``): a system prompt asking for JSON ``{"qa": [{"question", "answer",
"rationale"}]}`` about the record's passage, the record's images as base64 ``data:`` URLs (video frames
subsampled to ``max_images``) and ``response_format = {"type": "json_object"}``. Never required: the default
pipeline uses ``MetadataQAGenerator``.

The API key is read from the environment variable NAMED by ``api_key_env`` at call time; only that name
appears in configs and manifests, never the key. 429/5xx/connection errors are retried ``max_retries``
times with exponential backoff (``backoff_s * 2**attempt``), then ``GeneratorError`` names the URL, the
attempts and the last status. A reply that is not the expected JSON raises ``GeneratorOutputError`` (the
step counts it as a failed generation attempt and resamples).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from typing import Any

from tasks.data.qa_facts import Candidate, record_passage

SYSTEM_PROMPT = (
    "You write question-answer pairs for training a vision-language model. Every answer must be short "
    "(a word, a number or a short phrase) and copied or computed exactly from the given passage or images; "
    "never guess. Reply with a JSON object only: "
    '{"qa": [{"question": "...", "answer": "...", "rationale": "..."}]}.'
)
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class GeneratorError(RuntimeError):
    """The generation backend could not be reached or refused the request (after retries)."""


class GeneratorOutputError(ValueError):
    """The backend answered, but not with the expected JSON QA list."""


def _parse_qa(content: str) -> list[Candidate]:
    text = content.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    if fence:
        text = fence.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise GeneratorOutputError(f"model reply is not JSON ({e}): {text[:120]!r}") from None
    items = obj.get("qa", obj.get("pairs")) if isinstance(obj, dict) else obj
    if not isinstance(items, list):
        raise GeneratorOutputError(f'model reply has no "qa" list: {text[:120]!r}')
    out = []
    for it in items:
        if (
            isinstance(it, dict)
            and isinstance(it.get("question"), str)
            and isinstance(it.get("answer"), str | int | float)
        ):
            r = it.get("rationale")
            out.append(
                Candidate(
                    it["question"].strip(), str(it["answer"]).strip(), r if isinstance(r, str) else None
                )
            )
    return out


class OpenAICompatibleGenerator:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        temperature: float = 0.7,
        max_images: int = 8,
        max_context_chars: int = 2000,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.temperature = temperature
        self.max_images = max_images
        self.max_context_chars = max_context_chars
        self._sleep = sleep

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise GeneratorError(f"environment variable {self.api_key_env} (the API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def request_body(
        self, record: dict[str, Any], n: int, seed: int, avoid: Collection[str] = ()
    ) -> dict[str, Any]:
        passage = record_passage(record, self.max_context_chars)
        ask = f"Write {n} different question-answer pairs about "
        ask += "the images and the passage below." if record.get("images") else "the passage below."
        if avoid:
            ask += " Do not repeat these questions: " + " | ".join(sorted(avoid))
        ask += f"\n\nPassage:\n{passage or '(none)'}"
        images = list(record.get("images") or [])
        if len(images) > self.max_images:  # video: evenly spaced frames
            step = len(images) / self.max_images
            images = [images[int(i * step)] for i in range(self.max_images)]
        content: list[dict[str, Any]] = [{"type": "text", "text": ask}]
        for im in images:
            b64 = base64.b64encode(im["data"]).decode("ascii")
            url = f"data:{_MIME.get(im.get('format'), 'image/png')};base64,{b64}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
            "response_format": {"type": "json_object"},
            "temperature": self.temperature,
            "seed": seed,
        }

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200]
                if e.code != 429 and e.code < 500:
                    raise GeneratorError(f"{self.url}: HTTP {e.code} {e.reason}: {detail}") from None
                last = f"HTTP {e.code} {e.reason}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                raise GeneratorOutputError(f"{self.url}: response is not JSON ({e})") from None
            if attempt < self.max_retries:
                self._sleep(self.backoff_s * 2**attempt)
        raise GeneratorError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def generate(
        self, record: dict[str, Any], n: int, rng: Any, avoid: Collection[str] = ()
    ) -> list[Candidate]:
        reply = self._post(self.request_body(record, n, rng.randrange(2**31), avoid))
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GeneratorOutputError(f"{self.url}: no choices[0].message.content in the response") from None
        if not isinstance(content, str):
            raise GeneratorOutputError(f"{self.url}: message content is not a string")
        return _parse_qa(content)
