"""The reader study's SQLite file: schema, connections and token hashing.

One file holds one study: the cases (display image PNGs, each candidate's parsed reasoning and its box overlay PNG),
the readers (hashed personal tokens), each reader's case order and blinded candidate slots, the ratings, and the
sign-in sessions. The file holds the study's images: keep it as private as the dataset it came from.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from deepmedix.errors import DeepMedixError

AXES = ("relevance", "correctness", "completeness")

SCHEMA = """
CREATE TABLE study (
    id INTEGER PRIMARY KEY CHECK (id = 1),          -- one study per file
    created_at TEXT NOT NULL,
    data_uri TEXT NOT NULL,
    seed INTEGER NOT NULL,
    frame INTEGER NOT NULL CHECK (frame > 0)
);
CREATE TABLE model (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE CHECK (length(name) > 0),
    predictions TEXT NOT NULL
);
CREATE TABLE study_case (
    id INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    question TEXT NOT NULL,
    width INTEGER NOT NULL CHECK (width > 0),       -- original pixels
    height INTEGER NOT NULL CHECK (height > 0),
    image BLOB NOT NULL                             -- display PNG, no boxes
);
CREATE TABLE candidate (
    case_id INTEGER NOT NULL REFERENCES study_case(id),
    model_id INTEGER NOT NULL REFERENCES model(id),
    answer TEXT,                                    -- NULL: no \\boxed{} answer
    steps TEXT NOT NULL,                            -- JSON [{"text", "boxes": [{"box" (original px), "color"}]}]
    overlay BLOB NOT NULL,                          -- display PNG with this candidate's boxes
    PRIMARY KEY (case_id, model_id)
);
CREATE TABLE reader (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE CHECK (length(name) > 0),
    token_hash TEXT NOT NULL UNIQUE
);
CREATE TABLE assignment (                           -- a reader's cases, in that reader's order
    reader_id INTEGER NOT NULL REFERENCES reader(id),
    position INTEGER NOT NULL CHECK (position >= 1),
    case_id INTEGER NOT NULL REFERENCES study_case(id),
    PRIMARY KEY (reader_id, position),
    UNIQUE (reader_id, case_id)
);
CREATE TABLE slot (                                 -- blinding: "Candidate <slot>" is this model for this reader
    reader_id INTEGER NOT NULL,
    case_id INTEGER NOT NULL,
    slot INTEGER NOT NULL CHECK (slot >= 1),
    model_id INTEGER NOT NULL,
    PRIMARY KEY (reader_id, case_id, slot),
    UNIQUE (reader_id, case_id, model_id),
    FOREIGN KEY (reader_id, case_id) REFERENCES assignment(reader_id, case_id),
    FOREIGN KEY (case_id, model_id) REFERENCES candidate(case_id, model_id)
);
CREATE TABLE rating (                               -- one complete rating per reader and case
    reader_id INTEGER NOT NULL,
    case_id INTEGER NOT NULL,
    grounded_model_id INTEGER REFERENCES model(id), -- NULL: tie
    overall_model_id INTEGER REFERENCES model(id),  -- NULL: tie
    saved_at TEXT NOT NULL,
    PRIMARY KEY (reader_id, case_id),
    FOREIGN KEY (reader_id, case_id) REFERENCES assignment(reader_id, case_id)
);
CREATE TABLE score (
    reader_id INTEGER NOT NULL,
    case_id INTEGER NOT NULL,
    model_id INTEGER NOT NULL,
    relevance INTEGER NOT NULL CHECK (relevance BETWEEN 1 AND 5),
    correctness INTEGER NOT NULL CHECK (correctness BETWEEN 1 AND 5),
    completeness INTEGER NOT NULL CHECK (completeness BETWEEN 1 AND 5),
    PRIMARY KEY (reader_id, case_id, model_id),
    FOREIGN KEY (reader_id, case_id) REFERENCES rating(reader_id, case_id) ON DELETE CASCADE,
    FOREIGN KEY (case_id, model_id) REFERENCES candidate(case_id, model_id)
);
CREATE TABLE session (
    id_hash TEXT PRIMARY KEY,                       -- sha256 of the cookie value
    reader_id INTEGER NOT NULL REFERENCES reader(id),
    csrf TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX session_reader ON session(reader_id);
"""


class ReaderError(DeepMedixError, ValueError):
    """A study that cannot be created, served or exported as asked; the message says why."""


def token_hash(token: str) -> str:
    """Tokens and session ids are 192+ random bits, so a plain SHA-256 is enough to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def connect(db_path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection with foreign keys on and a busy timeout; ``create`` makes the file and its schema (WAL mode)."""
    path = Path(db_path)
    if not create and not path.is_file():
        raise ReaderError(f"{path}: no such study database")
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    if create:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
    elif conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'study'").fetchone()[0] != 1:
        conn.close()
        raise ReaderError(f"{path}: not a reader study database")
    return conn
