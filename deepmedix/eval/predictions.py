"""Reading an evaluation's prediction file (``predictions.jsonl``, written by :mod:`deepmedix.eval.run`) back, for
the Report Arena and the reader study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepmedix import store
from deepmedix.errors import InputError, MissingInputError

# the keys every prediction line of an evaluation has and the readers here use
PREDICTION_KEYS = ("record_id", "task", "prompt", "raw_output", "answer", "reference")


def predictions_file(uri: str) -> Path:
    """A predictions JSONL: a local or ``s3://`` ``.jsonl`` file, or ``predictions.jsonl`` in an evaluation's output
    folder (local or ``s3://``)."""
    if store.is_s3(uri):
        return store.fetch_file(uri) if uri.endswith(".jsonl") else store.fetch(uri) / "predictions.jsonl"
    p = store.local_path(uri)
    p = p / "predictions.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise MissingInputError(f"{uri}: no predictions file (expected predictions.jsonl or an evaluation output)")
    return p


def read_predictions(uri: str) -> dict[str, dict[str, Any]]:
    """Record id -> prediction row, checked: every line an object with :data:`PREDICTION_KEYS` (``record_id`` and
    ``raw_output`` strings), no record twice. ValueError names the file and line."""
    rows: dict[str, dict[str, Any]] = {}
    for no, _, row in store.jsonl_objects(predictions_file(uri), uri, expected="an evaluation prediction object"):
        missing = [k for k in PREDICTION_KEYS if k not in row]
        if missing:
            raise InputError(f"{uri}: line {no} lacks {missing} (not an evaluation predictions file?)")
        if not isinstance(row["record_id"], str) or not isinstance(row["raw_output"], str):
            raise InputError(f"{uri}: line {no}: 'record_id' and 'raw_output' must be strings")
        if row["record_id"] in rows:
            raise InputError(f"{uri}: line {no}: record {row['record_id']!r} appears twice")
        rows[row["record_id"]] = row
    return rows
