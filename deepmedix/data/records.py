"""The record as the model sees it: which records a stage takes (tasks, ratios, a cap), its images sized for the
model (:class:`~deepmedix.grounding.Frame`), its reference boxes in that frame, and the stage-1 target."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq
from PIL import Image

from deepmedix import store
from deepmedix.data.schema import Record, RecordError, load_records, read_shard, shard_paths
from deepmedix.errors import InputError
from deepmedix.grounding import BOX_RE, Frame, box_str


def select(records: list[Record], tasks: list[str], ratios: dict[str, float] | None = None, max_records: int = 0,
           seed: int = 0) -> list[Record]:
    """Keep the configured tasks, each sampled by its ratio (deterministic), capped at ``max_records``."""
    rng = random.Random(seed)
    ratios = ratios or {}
    out = []
    for task in tasks:
        subset = [r for r in records if r.task == task]
        keep = ratios.get(task, 1.0)
        if keep < 1.0:
            subset = rng.sample(subset, int(round(len(subset) * keep)))
        out.extend(subset)
    rng.shuffle(out)
    return out[:max_records] if max_records else out


def load_split(data_uri: str, split: str, tasks: list[str], ratios=None, max_records=0,
               seed=0) -> tuple[Path, list[Record]]:
    root = store.fetch(data_uri)
    return root, select(load_records(root, split), tasks, ratios, max_records, seed)


@dataclass(frozen=True)
class _Ref:
    record_id: str
    task: str


def select_ids(root: Path, split: str, tasks: list[str], ratios=None, max_records=0, seed=0) -> list[str]:
    """The ids :func:`select` picks from the split, in its order — from the shards' ``record_id`` and ``task``
    columns only, so choosing costs a few bytes per record, not a Record."""
    refs = []
    for path in shard_paths(root, split):
        try:
            table = pq.read_table(str(path), columns=["record_id", "task"])
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise RecordError(f"{path}: not a readable Parquet shard ({exc})") from exc
        refs.extend(map(_Ref, table.column("record_id").to_pylist(), table.column("task").to_pylist()))
    refs.sort(key=lambda r: r.record_id)  # load_records' order: the same sample for the same seed
    return [r.record_id for r in select(refs, tasks, ratios, max_records, seed)]


def iter_records(root: Path, split: str, ids: Iterable[str]) -> Iterator[Record]:
    """The records of ``ids``, a shard at a time (in the shards' order, not the ids')."""
    want = set(ids)
    for path in shard_paths(root, split):
        yield from (r for r in read_shard(path) if r.record_id in want)


def open_image(path_or_image, frame: Frame | None = None) -> Image.Image:
    """An RGB image; with ``frame``, resized to the size the frame hands the processor (:meth:`Frame.input_size`:
    the pixel budget with the aspect ratio kept, or the square). Every image the model sees — in training,
    evaluation and serving — goes through here, so its boxes are in ``frame`` and :meth:`Frame.from_frame` maps
    them back to the original pixels per axis."""
    if isinstance(path_or_image, Image.Image):
        img = path_or_image
    else:
        img = Image.open(path_or_image)
        img.load()
    img = img.convert("RGB")
    if frame is not None:
        size = frame.input_size(*img.size)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def image_file(root: Path, uri: str) -> str:
    """Where one of a record's images is: an ``s3://`` URI or absolute path as it is, a relative one under the
    dataset's root."""
    return uri if store.is_s3(uri) or Path(uri).is_absolute() else str(root / uri)


def load_image(where: str, frame: Frame | None, record_id: str = "", uri: str = "") -> Image.Image:
    """One image as the model sees it (see :func:`open_image`), from a path or an ``s3://`` URI; a file that cannot
    be read is an InputError naming the record and the image."""
    p = store.fetch_file(where) if store.is_s3(where) else Path(where)
    try:
        with Image.open(p) as im:
            return open_image(im, frame)
    except (OSError, ValueError) as exc:
        raise InputError(f"record {record_id}: image {uri or where} cannot be read ({exc})") from exc


def record_images(root: Path, rec: Record, frame: Frame | None = None) -> list[Image.Image]:
    """The record's images as the model sees them (RGB, sized by ``frame``; ``frame=None`` leaves the size to
    :func:`deepmedix.model.generate.generate`, which sizes them itself)."""
    return [load_image(image_file(root, uri), frame, rec.record_id, uri) for uri in rec.images]


def frame_boxes(rec: Record, frame: Frame) -> list[list[float]]:
    """The record's reference boxes (on its first image) in that image's model frame."""
    w, h = rec.image_sizes[0]
    return [frame.to_frame(b.box, w, h) for b in rec.boxes]


def frame_size(rec: Record, frame: Frame) -> tuple[int, int]:
    """(width, height) of the model frame of the record's first image, the image its boxes are on."""
    return frame.size(*rec.image_sizes[0])


def trace_in_frame(trace: str, rec: Record, frame: Frame) -> str:
    """A cold-start trace (boxes in the pixels of the record's first image) with every box moved to that image's
    model frame, per axis; the rest of the text is left as it is."""
    w, h = rec.image_sizes[0]
    return BOX_RE.sub(lambda m: box_str(frame.to_frame([float(v) for v in m.groups()], w, h)), trace)


def plain_target(rec: Record, frame: Frame) -> str:
    """Stage 1 target: the reference answer; grounding answers carry their boxes in the model frame."""
    if rec.task == "grounding":
        return f"{rec.answer} " + ", ".join(box_str(b) for b in frame_boxes(rec, frame))
    return rec.answer
