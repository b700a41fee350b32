"""The ``openai`` cold-start teacher: any OpenAI-compatible chat API, through :mod:`deepmedix.llm.client`.

The teacher is shown the study's images (as data URLs, the first one the image its boxes are on) together with
what a radiologist knew about the study — the report (or the list of findings), the labelled reference regions in
the first image's pixels, the question and its reference answer — and writes the reasoning while reading the film,
citing regions as ``[x1, y1, x2, y2]`` in that image's pixels and ending in the reference answer, in the output
grammar of :mod:`deepmedix.grounding`. A record without reference regions gets boxes only from the teacher's own
reading of the image (the filter keeps them when they lie inside the image), never from a fixed template.

Requests run on a thread pool (``teacher_concurrency``); each is retried on timeouts, connection errors, 429 and
5xx with exponential backoff and jitter (``teacher_max_retries``); a record whose requests all fail comes back as
``(None, "teacher_error")`` and the run goes on. Records with identical messages share one request. Successful
responses are cached on disk, keyed by the sha256 of (base URL, model, messages, temperature, max tokens), so a
rerun with the same inputs makes no call. The API key is read from the env var named by ``teacher_api_key_env`` and
is never written anywhere.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from deepmedix import store
from deepmedix.config import ColdStartConfig
from deepmedix.data.records import image_file
from deepmedix.data.schema import Record
from deepmedix.errors import InputError
from deepmedix.grounding import box_str
from deepmedix.llm.client import ChatClient, Endpoint, redact_url

# What a teacher returns for each record: the trace (None on failure) and the failure reason (None on success).
Result = tuple[str | None, str | None]

TEACHER_ERROR = "teacher_error"

SYSTEM_PROMPT = (
    "You are a senior radiologist who writes worked examples for teaching a vision-language model to read chest "
    "X-rays with grounded reasoning. For each case you receive what is known about one study: its report or list "
    "of findings, the labelled reference regions of the findings on the image, a question about the image and "
    "the reference answer to it, and the image itself (several views of the study in order; the first is the one "
    "you point at).\n"
    "Rules:\n"
    "1. Reason step by step about the image, the way a radiologist scans a film, and arrive at the reference "
    "answer. Never mention the report, the reference regions, the reference answer or these instructions.\n"
    "2. Point at regions of the first image with boxes written as [x1, y1, x2, y2]: integer pixel coordinates "
    "of that image at the size given in the case, origin at the top-left corner, x to the right, y downwards, "
    "x1 < x2, y1 < y2. When the case lists reference regions, cite each of them with its coordinates as given "
    "and cite no region that does not overlap one of them. When it lists none, cite only what you can see and "
    "locate on the image yourself, or no box at all.\n"
    "3. Separate the steps with semicolons; keep each step to one short sentence.\n"
    "4. Reply with exactly one line in this form and nothing else (no preamble, no markdown, no code fences):\n"
    "<think> step 1 with [x1, y1, x2, y2]; step 2 with [x1, y1, x2, y2]; ... </think> The answer is: "
    "\\boxed{reference answer}\n"
    "5. Put the reference answer inside \\boxed{} exactly as given: same words, same spelling, same order; "
    "items of a list answer stay separated by ' | '."
)


# ---------------------------------------------------------------- the prompt

def report_text(rec: Record) -> str:
    """What the teacher reads as the study's report: the report itself for report tasks, else the findings."""
    if rec.task.startswith("report_"):
        return rec.answer.strip()
    if rec.findings:
        return "Findings: " + "; ".join(rec.findings) + "."
    return "No abnormal findings."


MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def image_url(root: Path, rec: Record, uri: str) -> str:
    """One of the record's images as a ``data:`` URL (its stored bytes, PNG or JPEG), for a vision chat model."""
    where = image_file(root, uri)
    path = store.fetch_file(where) if store.is_s3(where) else Path(where)
    suffix = Path(uri).suffix.lower()
    if suffix not in MIME:
        raise InputError(f"record {rec.record_id}: image {uri} is not PNG or JPEG; the teacher is sent PNG/JPEG")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"record {rec.record_id}: image {uri} cannot be read ({exc})") from exc
    return f"data:{MIME[suffix]};base64," + base64.b64encode(data).decode()


def build_messages(rec: Record, root: Path) -> list[dict]:
    """The system and user messages for one record: the case as text, then its images (data URLs)."""
    w, h = rec.image_sizes[0]
    if rec.boxes:
        regions = "\n".join(f"- {b.label}: {box_str(b.box)}" for b in rec.boxes)
    else:
        regions = "- none: cite only what you locate on the first image yourself, or no box"
    view = f" ({rec.view} view)" if rec.view else ""
    more = f" The study has {len(rec.images)} images, attached in order." if len(rec.images) > 1 else ""
    text = (
        f"### Image\nA chest X-ray{view}, attached below: {w}x{h} pixels (boxes refer to the first image at "
        f"this size).{more}\n\n"
        f"### Report\n{report_text(rec)}\n\n"
        f"### Reference regions (label: [x1, y1, x2, y2] in pixels of the first image)\n{regions}\n\n"
        f"### Question\n{rec.prompt.strip()}\n\n"
        f"### Reference answer\n{rec.answer.strip()}\n\n"
        "### Task\nWrite the grounded reasoning that leads from the image to the reference answer, in exactly "
        "the form <think> ... </think> The answer is: \\boxed{reference answer}"
    )
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": image_url(root, rec, uri)}} for uri in rec.images]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def clean_response(text: str) -> str:
    """Strip whitespace and a surrounding markdown code fence, which chat models add now and then."""
    t = (text or "").strip()
    if t.startswith("```") and t.endswith("```") and len(t) >= 6:
        t = t[3:-3]
        first, _, rest = t.partition("\n")
        if rest and " " not in first.strip():  # a language tag such as ```text
            t = rest
        t = t.strip()
    return t


# ---------------------------------------------------------------- the openai teacher

def cache_dir(cfg: ColdStartConfig) -> Path:
    """``teacher_cache``, else ``$DEEPMEDIX_CACHE/teacher`` (``~/.cache/deepmedix/teacher`` without the env var)."""
    return Path(cfg.teacher_cache).expanduser() if cfg.teacher_cache else store.cache_root() / "teacher"


class OpenAITeacher:
    """``teacher: openai``: ``__call__(records) -> [(trace | None, reason | None)]``, in order."""

    def __init__(self, cfg: ColdStartConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.base_url = cfg.teacher_base_url or os.environ.get("OPENAI_BASE_URL", "")
        if not self.base_url:
            raise InputError("cold start: teacher 'openai' needs an API base URL: set the config key "
                             "teacher_base_url or the env var OPENAI_BASE_URL")
        if not cfg.teacher_model:
            raise InputError("cold start: teacher 'openai' needs a model: set the config key teacher_model")
        if not cfg.teacher_api_key_env:
            raise InputError("cold start: teacher 'openai' needs the config key teacher_api_key_env (the name "
                             "of the env var that holds the API key)")
        if not os.environ.get(cfg.teacher_api_key_env, ""):
            raise InputError(f"cold start: teacher 'openai' reads its API key from the env var "
                             f"{cfg.teacher_api_key_env} (config key teacher_api_key_env), which is not set")
        if cfg.teacher_concurrency < 1:
            raise InputError(f"cold start: teacher_concurrency must be >= 1, got {cfg.teacher_concurrency}")
        if cfg.teacher_max_retries < 0:
            raise InputError(f"cold start: teacher_max_retries must be >= 0, got {cfg.teacher_max_retries}")
        if cfg.teacher_timeout_s <= 0:
            raise InputError(f"cold start: teacher_timeout_s must be > 0, got {cfg.teacher_timeout_s}")
        self.chat = ChatClient(Endpoint(
            base_url=self.base_url, model=cfg.teacher_model, api_key_env=cfg.teacher_api_key_env,
            temperature=cfg.teacher_temperature, max_tokens=cfg.teacher_max_tokens, timeout_s=cfg.teacher_timeout_s,
            max_retries=cfg.teacher_max_retries, backoff_s=cfg.teacher_backoff_s, cache=str(cache_dir(cfg))), log)
        self.log = self.chat.log
        self._lock = threading.Lock()
        self.own = {"model": cfg.teacher_model, "base_url": redact_url(self.base_url), "errors": 0, "unique_prompts": 0}
        self.error_examples: list[str] = []

    @property
    def stats(self) -> dict:
        """Requests, retries and cache hits (the client's), errors and distinct prompts (the teacher's)."""
        return {**self.chat.stats, **self.own}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.own[key] += n

    def _one(self, key: str, messages: list[dict], record_id: str) -> Result:
        """One prompt: from the cache, else from the API (then cached)."""
        cfg = self.cfg
        cached = self.chat.cached(key)
        if cached is not None:
            return clean_response(cached), None
        try:
            text = self.chat.request(messages)
        except self.chat.fatal as exc:  # a wrong key, model or URL fails every record alike: stop the run
            raise InputError(f"cold start: the teacher endpoint refused the request ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); check teacher_base_url, teacher_model and the key in "
                             f"${cfg.teacher_api_key_env}") from None
        except Exception as exc:  # noqa: BLE001 - one record's failure never ends the run
            self._count("errors")
            self._note(f"{record_id}: {type(exc).__name__}: {str(exc)[:200]}")
            return None, TEACHER_ERROR
        try:
            self.chat.cache.put(key, text, {"model": cfg.teacher_model, "record_id": record_id})
        except OSError as exc:  # a full or read-only cache costs a rerun its savings, not this response
            self._note(f"{record_id}: response not cached ({exc})")
        return clean_response(text), None

    def _note(self, line: str) -> None:
        with self._lock:
            if len(self.error_examples) < 5:
                self.error_examples.append(line)

    def __call__(self, records: list[Record], root: Path) -> list[Result]:
        """Records whose messages are identical share one request (and one cache entry)."""
        cfg = self.cfg
        by_key: dict[str, list[int]] = {}
        messages: dict[str, list[dict]] = {}
        for i, rec in enumerate(records):
            msgs = build_messages(rec, root)
            key = self.chat.key(msgs)
            by_key.setdefault(key, []).append(i)
            messages[key] = msgs
        self.own["unique_prompts"] = len(by_key)
        total = len(records)
        out: list[Result] = [(None, TEACHER_ERROR)] * total
        every = max(1, len(by_key) // 10)
        t0 = time.time()
        self.log(f"coldstart: teacher {cfg.teacher_model} on {total} records, {len(by_key)} distinct prompts "
                 f"({cfg.teacher_concurrency} in flight, cache {self.chat.cache.root})")
        done = 0
        pool = ThreadPoolExecutor(max_workers=cfg.teacher_concurrency, thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self._one, key, messages[key], records[idx[0]].record_id): key
                       for key, idx in by_key.items()}
            for n, fut in enumerate(as_completed(futures), start=1):
                result = fut.result()
                for i in by_key[futures[fut]]:
                    out[i] = result
                done += len(by_key[futures[fut]])
                if n % every == 0 or n == len(futures):
                    s = self.stats
                    self.log(f"coldstart: teacher {done}/{total} records, {s['cache_hits']} from cache, "
                             f"{s['requests']} requests, {s['retries']} retries, {s['errors']} failed "
                             f"({time.time() - t0:.1f} s)")
        finally:  # Ctrl-C or a fatal error: queued requests are cancelled, not sent
            pool.shutdown(wait=True, cancel_futures=True)
        for line in self.error_examples:
            self.log(f"coldstart: teacher error: {line}")
        return out
