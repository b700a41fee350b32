"""One chunk of the curation engine (see :mod:`deepmedix.data.curate` for the flow).

``prepare_chunk`` does the state-free work (type checks, text cleaning, the image jobs for the worker processes);
``finish_chunk`` does the stateful work on the workers' results, in stream order (record ids, image and record
dedupe, boxes rescaled into the stored image, splits, Records) and returns the chunk's marker and its Records by
split; ``parquet_bytes`` encodes one shard. ``chunk_digest`` is what the chunk was made from, to tell whether a
rerun may replay it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deepmedix.config import CurateConfig
from deepmedix.data import images as imgs
from deepmedix.data import text as txt
from deepmedix.data.curate_state import SourceSpec, State, seeded_split, sha64, u64
from deepmedix.data.schema import SPLITS, Box, Record, RecordError
from deepmedix.data.sources import ImageRef, Item, Quarantine, Root


def chunk_digest(spec: SourceSpec, items: list[Item], qs: list[Quarantine]) -> str:
    """What the chunk was made from (metadata, texts, image paths or in-memory bytes, the adapter's refusals)."""
    d = hashlib.blake2b(digest_size=16)
    for it in items:
        refs = [r.path or (hashlib.sha1(r.data).hexdigest() if isinstance(r.data, bytes) else repr(r))
                for r in (it.images if isinstance(it.images, list) else [])]
        d.update(repr((spec.name, it.record_id, it.patient_id, it.study_id, it.task, it.prompt, it.answer, refs,
                       [(b.label, b.box) for b in it.boxes] if isinstance(it.boxes, list) else repr(it.boxes),
                       it.box_frame, it.split, it.view, it.question_type, it.findings,
                       [(b.label, b.box) for b in it.landmarks] if isinstance(it.landmarks, list)
                       else repr(it.landmarks))).encode())
    for q in qs:
        d.update(repr(q.to_dict()).encode())
    return d.hexdigest()


def _ref_key(item_root: Root | None, ref: ImageRef) -> tuple[str, tuple]:
    if ref.data is not None:
        k = "mem:" + hashlib.sha1(ref.data).hexdigest()
        return k, (k, None, "", ref.data, ref.name or "<in-memory image>")
    root = ref.root or item_root
    if root is None or not isinstance(ref.path, str) or not ref.path:
        raise TypeError("an image reference has neither a path under a root nor bytes")
    k = f"{root.uri}|{ref.path}"
    return k, (k, root, ref.path, None, ref.path)


def _check_item(it: Item) -> None:
    """Types an adapter could get wrong; a TypeError here quarantines the item."""
    for name in ("record_id", "patient_id", "study_id", "task", "prompt", "answer", "split", "view",
                 "question_type", "trace", "file"):
        v = getattr(it, name)
        if v is not None and not isinstance(v, str):
            raise TypeError(f"field '{name}' is {type(v).__name__}, expected text")
    if not isinstance(it.images, list) or not all(isinstance(r, ImageRef) for r in it.images):
        raise TypeError("field 'images' must be a list of ImageRef")
    for name in ("boxes", "landmarks"):
        v = getattr(it, name)
        if not isinstance(v, list) or not all(isinstance(b, Box) for b in v):
            raise TypeError(f"field '{name}' must be a list of Box")
    if not isinstance(it.findings, list) or not all(isinstance(f, str) for f in it.findings):
        raise TypeError("field 'findings' must be a list of text")


def _scale_boxes(item: Item, size: tuple[int, int], orig: tuple[int, int], boxes: list[Box] | None = None
                 ) -> list[Box] | str:
    """``boxes`` (default: the item's) from the item's box frame into the stored image's pixels, or why not."""
    try:
        fw, fh = (float(v) for v in (item.box_frame or orig))
        if not (fw > 0 and fh > 0):
            return f"box frame {item.box_frame} is not a size"
        sx, sy = size[0] / fw, size[1] / fh
        out = []
        for b in item.boxes if boxes is None else boxes:
            if not isinstance(b.label, str) or len(b.box) != 4:
                return f"box {b.label!r} {b.box!r} is not a label with [x1, y1, x2, y2]"
            x1, y1, x2, y2 = (float(v) for v in b.box)
            if not all(map(lambda v: v == v and abs(v) != float("inf"), (x1, y1, x2, y2))):
                return f"box {b.label!r} {list(b.box)} has a coordinate that is not a finite number"
            if not (x1 < x2 and y1 < y2):
                return f"box {b.label!r} {list(b.box)} has no area"
            if x2 <= 0 or y2 <= 0 or x1 >= fw or y1 >= fh:
                return f"box {b.label!r} {list(b.box)} lies outside the {fw:g}x{fh:g} image"
            nb = [max(0.0, x1 * sx), max(0.0, y1 * sy), min(size[0], x2 * sx), min(size[1], y2 * sy)]
            if not (nb[0] < nb[2] and nb[1] < nb[3]):
                return f"box {b.label!r} {list(b.box)} vanishes at {size[0]}x{size[1]}"
            out.append(Box(b.label, [round(v, 2) for v in nb]))
        return out
    except (TypeError, ValueError) as exc:
        return f"malformed box ({exc})"


@dataclass
class Prep:
    spec: SourceSpec
    k: int
    items: list[Item]
    digest: str
    marker: str
    bad: list[dict[str, str]]
    clean: list[tuple[Item, str, str, list[str]]]  # item, prompt, answer, image keys
    handle: Any = None


def prepare_chunk(cfg: CurateConfig, spec: SourceSpec, k: int, items: list[Item], qs: list[Quarantine],
                  root: Root | None, digest: str, marker: str) -> tuple[Prep, list[tuple]]:
    """The chunk's state-free work: type checks, text cleaning, the image jobs."""
    prep = Prep(spec, k, items, digest, marker, [q.to_dict() for q in qs], [])
    clean_t = txt.clean_report_text if cfg.scrub_phi else txt.normalize
    jobs: dict[str, tuple] = {}
    for it in items:
        try:
            _check_item(it)
            prompt, answer = clean_t(it.prompt or ""), clean_t(it.answer or "")
            keys = []
            for ref in it.images:
                key, job = _ref_key(root, ref)
                keys.append(key)
                jobs.setdefault(key, job)
        except (TypeError, ValueError, AttributeError) as exc:
            _drop(prep, it, "", f"malformed item from the adapter ({exc})")
            continue
        if not prompt:
            _drop(prep, it, "", "empty prompt text")
        elif not answer:
            _drop(prep, it, "", "empty answer text")
        elif not keys:
            _drop(prep, it, "", "no image")
        else:
            prep.clean.append((it, prompt, answer, keys))
    return prep, list(jobs.values())


def _drop(prep: Prep, it: Item, file: str, reason: str) -> None:
    prep.bad.append({"source": prep.spec.name, "file": str(file or getattr(it, "file", "") or ""),
                     "reason": reason, "record": f"{prep.spec.name}/{getattr(it, 'record_id', '')}"})


def finish_chunk(cfg: CurateConfig, prep: Prep, results: dict[str, tuple], st: State) -> tuple[dict, dict]:
    """The chunk's stateful work, in stream order: ids, dedupe, boxes, splits, Records. Returns (marker, shards
    by split)."""
    spec = prep.spec
    ids: set[str] = set()
    kept: list[Record] = []
    new_sha: dict[str, tuple[str, str]] = {}
    new_ph: list[tuple[int, str, str]] = []
    new_keys: dict[str, str] = {}
    new_pat: dict[str, str] = {}
    img_digest = hashlib.blake2b(digest_size=16)
    reassigned = 0
    for it, prompt, answer, keys in prep.clean:
        rid = f"{spec.name}/{it.record_id}"
        if rid in ids or u64(rid) in st.ids:
            _drop(prep, it, "", f"duplicate record id {rid}")
            continue
        ids.add(rid)
        res = [results[k] for k in keys]
        img_digest.update(repr([r[1] if r[0] == "ok" else r for r in res]).encode())
        failed = [r for r in res if r[0] == "bad"]
        if failed:
            _drop(prep, it, failed[0][1], failed[0][2])
            continue
        owner = (it.patient_id, it.study_id)
        dup = None
        for _, sha, _, _, ph in (res if cfg.dedupe_images else []):
            i = st.sha_owner.get(sha64(sha))
            o = st.owners[i] if i is not None else None
            if o is not None and o != owner:
                dup = f"duplicate image: identical to an image of study {o[1]}"
                break
            if st.phash is not None:  # follow-up studies of one patient may look alike: only across patients
                hit = st.phash.find(ph, skip=lambda i, pid=it.patient_id: st.owners[i][0] == pid)
                if hit is not None:
                    dup = (f"near-duplicate image (perceptual hash distance {(hit[0] ^ ph).bit_count()}) of an "
                           f"image of study {st.owners[hit[1]][1]} of another patient")
                    break
        if dup:
            _drop(prep, it, it.images[0].label(), dup)
            continue
        boxes = _scale_boxes(it, res[0][2], res[0][3]) if it.boxes else []
        marks = _scale_boxes(it, res[0][2], res[0][3], it.landmarks) if it.landmarks else []
        if isinstance(boxes, str) or isinstance(marks, str):
            _drop(prep, it, "", boxes if isinstance(boxes, str) else f"landmark: {marks}")
            continue
        split = it.split or seeded_split(it.patient_id, cfg.seed, cfg.split_ratios)
        if split not in SPLITS:
            _drop(prep, it, "", f"split {split!r} is not one of {SPLITS}")
            continue
        placed = st.patient_split.get(it.patient_id) or new_pat.get(it.patient_id)
        if placed and placed != split:
            split = placed
            reassigned += 1
        rel_imgs = [imgs.image_rel(r[1]) for r in res]
        key = "|".join([it.task, ",".join(sorted(rel_imgs)), txt.dedupe_key(prompt), txt.dedupe_key(answer),
                        json.dumps([[b.label, [round(v, 1) for v in b.box]] for b in boxes])])
        key = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        first = (st.rec_key_owner(key) or new_keys.get(key)) if cfg.dedupe_texts else None
        if first is not None:
            _drop(prep, it, "", f"duplicate record: same images, prompt, answer and boxes as {first}")
            continue
        try:
            rec = Record(record_id=rid, patient_id=it.patient_id, study_id=it.study_id, source=spec.name,
                         images=rel_imgs, image_sizes=[list(r[2]) for r in res], task=it.task, prompt=prompt,
                         answer=answer, split=split, view=it.view or "", question_type=it.question_type or "",
                         boxes=boxes, findings=list(it.findings), trace=it.trace or "", landmarks=marks).validate()
        except RecordError as exc:
            _drop(prep, it, "", str(exc))
            continue
        kept.append(rec)
        new_keys[key] = rid
        new_pat.setdefault(it.patient_id, split)
        oi = st.owner(owner) if res else -1
        for _, sha, _, _, ph in res:
            new_sha.setdefault(sha, owner)
            new_ph.append((ph, *owner))
            st.add_image(sha, oi, ph)  # later records of this chunk see it; the replay adds it again (no-op)
    counts: dict[str, int] = {}
    by_split: dict[str, list[Record]] = {}
    for r in kept:
        by_split.setdefault(r.split, []).append(r)
        counts[f"{r.source}/{r.task}/{r.split}"] = counts.get(f"{r.source}/{r.task}/{r.split}", 0) + 1
    marker = {"ids": sorted(ids), "shas": {k: list(v) for k, v in new_sha.items()},
              "phashes": [[str(h), p, s] for h, p, s in new_ph], "rec_keys": new_keys, "patients": new_pat,
              "counts": counts, "quarantine": prep.bad, "images": sorted({i for r in kept for i in r.images}),
              "reassigned": reassigned, "items": len(prep.items), "digest": prep.digest,
              "image_digest": img_digest.hexdigest(), "shards": {}}
    return marker, by_split


def parquet_bytes(records: list[Record]) -> bytes:
    from deepmedix.data.schema import ARROW_SCHEMA

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([r.to_row() for r in records], schema=ARROW_SCHEMA), buf)
    return buf.getvalue()
