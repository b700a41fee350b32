"""Prometheus metrics, in the default registry that KServe's ``GET /metrics`` exposes.

=======================================  =========  ==========================================================
``deepmedix_requests_total``             counter    by ``route`` (v1_predict, v2_infer, openai_chat, ...) and
                                                    HTTP ``code``
``deepmedix_request_duration_seconds``   histogram  by ``route``
``deepmedix_batch_size``                 histogram  queries per ``generate``
``deepmedix_generate_duration_seconds``  histogram  seconds per ``generate``
``deepmedix_generated_tokens_total``     counter    completion tokens
``deepmedix_prompt_tokens_total``        counter    prompt tokens (image tokens included)
``deepmedix_queue_waiting``              gauge      queries waiting for a batch
``deepmedix_rejected_total``             counter    by ``reason`` (queue_full, timeout, unauthorized,
                                                    too_large)
=======================================  =========  ==========================================================
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("deepmedix_requests", "HTTP requests by route and status code", ["route", "code"])
LATENCY = Histogram("deepmedix_request_duration_seconds", "Request latency by route", ["route"],
                    buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("deepmedix_batch_size", "Queries per batched generate",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
GENERATE_SECONDS = Histogram("deepmedix_generate_duration_seconds", "Seconds per batched generate",
                             buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("deepmedix_generated_tokens", "Completion tokens generated")
PROMPT_TOKENS = Counter("deepmedix_prompt_tokens", "Prompt tokens processed (image tokens included)")
QUEUE = Gauge("deepmedix_queue_waiting", "Queries waiting for a batch")
REJECTED = Counter("deepmedix_rejected", "Requests refused before generation", ["reason"])


def route_of(path: str) -> str:
    """A small, fixed set of route labels (never the raw path: bounded label cardinality)."""
    if path.startswith("/openai/v1/chat/completions"):
        return "openai_chat"
    if path.startswith("/openai/v1/models"):
        return "openai_models"
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return "v1_predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    if path == "/metrics":
        return "metrics"
    if path == "/" or path.startswith("/v2/health") or path.startswith(("/v1/models", "/v2/models")):
        return "health"
    return "other"
