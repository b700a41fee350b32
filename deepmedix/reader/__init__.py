"""The expert reader study: create a blinded study from evaluation predictions, serve it to readers, export the
per-model table (per-axis means and preference shares) as CSV, markdown and PNG."""

from __future__ import annotations

from deepmedix.reader.app import make_app, serve
from deepmedix.reader.db import ReaderError
from deepmedix.reader.export import export
from deepmedix.reader.study import create_study

__all__ = ["ReaderError", "create_study", "export", "make_app", "serve"]
