"""One client for OpenAI-compatible chat endpoints, shared by the cold-start teacher
(:mod:`deepmedix.synth.teacher`) and the Report Arena's judges (:mod:`deepmedix.eval.arena_judging`).

An :class:`Endpoint` says where and how to ask (base URL, model, the NAME of the env var that holds the key,
sampling, timeout, retries, the reply cache's folder). :class:`ChatClient` asks: each request is retried on
timeouts, connection errors, 429 and 5xx with exponential backoff and jitter, waiting at least as long as the
server's ``Retry-After`` (``retry-after-ms``) asks, at most :data:`MAX_DELAY_S`; 401, 403 and 404 are fatal
(:attr:`ChatClient.fatal`: every later request would fail alike). Replies are cached on disk, keyed by the sha256
of (base URL, model, messages, temperature, max tokens), so a rerun with the same inputs makes no call. The key is
read from the environment and never written anywhere; reports name the endpoint by :func:`redact_url`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from deepmedix.errors import MissingToolError

MAX_DELAY_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask. The caller checks the values against its own config keys first."""
    base_url: str
    model: str
    api_key_env: str              # the NAME of the env var that holds the key
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 60.0
    max_retries: int = 4          # retries per request on timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0        # the first retry's delay; doubles per retry, with jitter
    cache: str = ""               # the reply cache's folder


def redact_url(url: str) -> str:
    """The URL without user:password, for reports and lineage."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def cache_key(base_url: str, model: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
    blob = json.dumps({"base_url": base_url, "model": model, "messages": messages, "temperature": temperature,
                       "max_tokens": max_tokens}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """One JSON file per response under ``root/<key[:2]>/<key>.json``, written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text())["text"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, text: str, meta: dict[str, Any] | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps({"text": text, **(meta or {})}, ensure_ascii=False))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _retry_after(exc: Exception) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``), if it said."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


class ChatClient:
    """Chat completions from one :class:`Endpoint`, with retries, and its reply cache."""

    def __init__(self, endpoint: Endpoint, log: Callable[[str], None] | None = None):
        try:
            import openai
        except ImportError as exc:
            raise MissingToolError("an OpenAI-compatible endpoint needs the openai package (pip install openai)"
                                   ) from exc
        self.endpoint = endpoint
        self.openai = openai
        self.fatal = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
        self.client = openai.OpenAI(base_url=endpoint.base_url, api_key=os.environ.get(endpoint.api_key_env, ""),
                                    timeout=endpoint.timeout_s, max_retries=0)
        self.cache = ResponseCache(Path(endpoint.cache))
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def key(self, messages: list[dict[str, str]]) -> str:
        ep = self.endpoint
        return cache_key(ep.base_url, ep.model, messages, ep.temperature, ep.max_tokens)

    def cached(self, key: str) -> str | None:
        """The cached reply for ``key`` (counted as a cache hit), or None."""
        text = self.cache.get(key)
        if text is not None:
            self.count("cache_hits")
        return text

    def _retryable(self, exc: Exception) -> bool:
        oa = self.openai
        if isinstance(exc, (oa.APITimeoutError, oa.APIConnectionError, oa.RateLimitError, oa.InternalServerError)):
            return True
        return isinstance(exc, oa.APIStatusError) and exc.status_code >= 500

    def _delay(self, attempt: int, exc: Exception) -> float:
        delay = self.endpoint.backoff_s * (2 ** attempt) * random.uniform(0.5, 1.0)
        asked = _retry_after(exc)
        if asked is not None:
            delay = max(delay, asked)
        return min(delay, MAX_DELAY_S)

    def request(self, messages: list[dict[str, str]]) -> str:
        """One completion, with retries; raises the last error when every attempt failed. A reply cut at
        ``max_tokens`` is an error (and never cached)."""
        ep = self.endpoint
        for attempt in range(ep.max_retries + 1):
            self.count("requests")
            try:
                resp = self.client.chat.completions.create(
                    model=ep.model, messages=messages, temperature=ep.temperature, max_tokens=ep.max_tokens)
            except Exception as exc:  # noqa: BLE001 - classified below; anything else is not retried
                if attempt < ep.max_retries and self._retryable(exc):
                    self.count("retries")
                    time.sleep(self._delay(attempt, exc))
                    continue
                raise
            if not resp.choices or not resp.choices[0].message.content:
                raise RuntimeError("the response has no message content")
            if resp.choices[0].finish_reason == "length":
                raise RuntimeError(f"the response was cut at max_tokens={ep.max_tokens}")
            return resp.choices[0].message.content
        raise AssertionError("unreachable")
