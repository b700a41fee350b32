"""The Record: one training or evaluation example, the same type from curation to evaluation.

A dataset folder holds Parquet shards of Records plus the images they point to::

    DATASET/
      records/<split>-00000.parquet   one or more shards per split
      images/<sha256-prefix>.png      content-addressed images
      manifest.json                   counts per source x task x split
      lineage.json                    config, code version, input hashes

Image URIs in a Record are relative to the dataset folder (or absolute ``file://`` / ``s3://`` URIs).
Boxes are ``[x1, y1, x2, y2]`` in the original image's pixels; :mod:`deepmedix.grounding` converts them to the
model's frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from deepmedix.errors import DeepMedixError, MissingInputError
from deepmedix.grounding import inside

REPORT_TASKS = ("report_findings", "report_impression")
TASKS = (*REPORT_TASKS, "vqa", "grounding")
SPLITS = ("train", "validate", "test")
# Medical-CXR-VQA's six types, then MIMIC-CXR-VQA's content types that are not among them.
QUESTION_TYPES = ("presence", "abnormality", "location", "level", "view", "type",
                  "anatomy", "attribute", "plane", "gender", "size")

BOX_TYPE = pa.struct([("label", pa.string()), ("box", pa.list_(pa.float64(), 4))])

ARROW_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("source", pa.string()),
        ("images", pa.list_(pa.string())),
        ("image_sizes", pa.list_(pa.list_(pa.int32(), 2))),
        ("view", pa.string()),
        ("task", pa.string()),
        ("question_type", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("boxes", pa.list_(BOX_TYPE)),
        ("findings", pa.list_(pa.string())),
        ("trace", pa.string()),
        ("split", pa.string()),
        ("landmarks", pa.list_(BOX_TYPE)),
    ]
)


class RecordError(DeepMedixError, ValueError):
    """A record that breaks the schema; the message names the record and the field."""


@dataclass
class Box:
    label: str
    box: list[float]  # [x1, y1, x2, y2], original pixels

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "box": [float(v) for v in self.box]}


@dataclass
class Record:
    record_id: str
    patient_id: str
    study_id: str
    source: str
    images: list[str]
    image_sizes: list[list[int]]  # [width, height] per image
    task: str
    prompt: str
    answer: str
    split: str
    view: str = ""
    question_type: str = ""
    boxes: list[Box] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    trace: str = ""
    landmarks: list[Box] = field(default_factory=list)  # anatomy on images[0] (the phantom's lungs, heart)

    def validate(self) -> "Record":
        rid = self.record_id or "<missing id>"
        for name in ("record_id", "patient_id", "study_id", "source", "task", "prompt", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecordError(f"record {rid}: field '{name}' must be a non-empty string")
        if self.task not in TASKS:
            raise RecordError(f"record {rid}: field 'task' is {self.task!r}, expected one of {TASKS}")
        if self.split not in SPLITS:
            raise RecordError(f"record {rid}: field 'split' is {self.split!r}, expected one of {SPLITS}")
        if self.task == "vqa" and self.question_type not in QUESTION_TYPES:
            raise RecordError(
                f"record {rid}: field 'question_type' is {self.question_type!r}, expected one of {QUESTION_TYPES}"
            )
        if not self.images:
            raise RecordError(f"record {rid}: field 'images' is empty")
        if len(self.image_sizes) != len(self.images):
            raise RecordError(f"record {rid}: field 'image_sizes' has {len(self.image_sizes)} entries for "
                              f"{len(self.images)} images")
        for name in ("boxes", "landmarks"):
            for i, b in enumerate(getattr(self, name)):
                if len(b.box) != 4:
                    raise RecordError(f"record {rid}: field '{name}[{i}].box' must have 4 numbers")
                w, h = self.image_sizes[0]
                if not inside(b.box, w, h):
                    raise RecordError(f"record {rid}: field '{name}[{i}].box' {b.box} is not a box inside {w}x{h}")
        return self

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["boxes"] = [b.to_dict() for b in self.boxes]
        row["landmarks"] = [b.to_dict() for b in self.landmarks]
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Record":
        row = dict(row)
        for key in ("boxes", "landmarks"):  # a shard written before landmarks has no such column
            row[key] = [Box(label=b["label"], box=list(b["box"])) for b in (row.get(key) or [])]
        row["image_sizes"] = [list(s) for s in (row.get("image_sizes") or [])]
        for k in ("view", "question_type", "trace"):
            row[k] = row.get(k) or ""
        row["findings"] = list(row.get("findings") or [])
        return cls(**row)


def write_shard(records: Iterable[Record], path: str | Path) -> int:
    """Write records (validated) to one Parquet file. Returns the number written."""
    rows = [r.validate().to_row() for r in records]
    table = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
    pq.write_table(table, str(path))
    return len(rows)


def read_shard(path: str | Path) -> list[Record]:
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise RecordError(f"{path}: not a readable Parquet shard ({exc})") from exc
    missing = [n for n in ("record_id", "task", "prompt", "answer", "images", "split") if n not in table.column_names]
    if missing:
        raise RecordError(f"{path}: missing column(s) {missing}")
    out = []
    for row in table.to_pylist():
        try:
            out.append(Record.from_row(row).validate())
        except TypeError as exc:
            raise RecordError(f"{path}: record {row.get('record_id')}: {exc}") from exc
        except RecordError as exc:
            raise RecordError(f"{path}: {exc}") from exc
    return out


def shard_paths(dataset_dir: str | Path, split: str | None = None) -> list[Path]:
    rec_dir = Path(dataset_dir) / "records"
    if (Path(dataset_dir) / "_work").is_dir() and not (Path(dataset_dir) / "lineage.json").exists():
        raise RecordError(f"{dataset_dir}: curation has not finished (no lineage.json, _work/ present); "
                          f"rerun the same curate command to complete it")
    if not rec_dir.is_dir():
        raise MissingInputError(f"{dataset_dir}: no records/ folder — not a DeepMedix dataset")
    pattern = f"{split}-*.parquet" if split else "*.parquet"
    return sorted(rec_dir.glob(pattern))


def load_records(dataset_dir: str | Path, split: str | None = None, tasks: Iterable[str] | None = None,
                 limit: int | None = None) -> list[Record]:
    tasks = set(tasks) if tasks else None
    out: list[Record] = []
    for p in shard_paths(dataset_dir, split):
        for r in read_shard(p):
            if tasks is None or r.task in tasks:
                out.append(r)
    out.sort(key=lambda r: r.record_id)
    return out[:limit] if limit else out


def manifest(records: Iterable[Record]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    patients: dict[str, set[str]] = {}
    for r in records:
        key = f"{r.source}/{r.task}/{r.split}"
        counts[key] = counts.get(key, 0) + 1
        patients.setdefault(r.split, set()).add(r.patient_id)
    return {"counts": dict(sorted(counts.items())),
            "patients_per_split": {k: len(v) for k, v in sorted(patients.items())},
            "total": sum(counts.values())}
