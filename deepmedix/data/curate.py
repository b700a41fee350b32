"""Curation engine: source adapters in, one dataset of Records out (Parquet shards per split + images).

Flow, per source in config order: the adapter streams Items (and Quarantine entries for inputs it refused);
the engine cuts the stream into chunks of ``shard_size`` Items and, per chunk,

1. cleans the texts (normalisation, PHI scrub), refuses empty texts and duplicate record ids;
2. decodes, checks, resizes and stores each image once (worker processes; content-addressed PNGs);
3. drops exact and perceptual duplicate images that belong to another patient/study, and duplicate records
   (same images, normalised prompt and answer);
4. rescales boxes into the stored image, assigns the split (official where the dataset has one, else a seeded
   hash of the patient id; a patient already placed keeps its split), validates the Record;
5. writes one Parquet shard per split atomically, then the chunk's marker under ``_work/`` (the chunk's commit).

Image work for chunk k+1 runs in the workers while the main process finishes chunk k. A rerun with the same config
skips chunks whose marker exists, whose input digest still matches and whose files are all there (their state is
replayed from the marker), and so finishes an interrupted run. At the end: ``quarantine.jsonl``, ``manifest.json``,
unreferenced images and stale shards removed, the no-patient-in-two-splits check over the written shards, then
``lineage.json`` — the commit marker of the whole dataset — and ``_work/`` is removed. Nothing is loaded whole:
memory is bounded by two chunks plus the dedupe indexes (about a kilobyte per image, a hundred bytes per record).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from deepmedix import store
from deepmedix.config import ConfigError, CurateConfig, to_dict
from deepmedix.data import images as imgs
from deepmedix.data import text as txt
from deepmedix.data.compact import U64Map
from deepmedix.data.schema import SPLITS, Box, Record, RecordError
from deepmedix.data.sink import Sink
from deepmedix.data.sources import ImageRef, Item, Quarantine, Root, Source, get_source
from deepmedix.data.workers import ImagePool
from deepmedix.errors import CurationError, sigterm_exits

Progress = Callable[[int, int], None]
WORK = "_work"
_PHANTOM_KEYS = ("n_patients", "studies_per_patient", "image_size", "vqa_per_study", "split_ratios", "seed",
                 "n_studies")


# ------------------------------------------------------------------------------------------------ the state

@dataclass
class SourceSpec:
    index: int
    name: str
    root: str
    ratio: float = 1.0
    limit: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass
class State:
    """What later chunks must know of earlier ones. The per-image and per-record parts are compact tables
    (64-bit keys in numpy arrays), so a run's memory grows by a few hundred bytes an image, not kilobytes."""
    ids: U64Map = field(default_factory=U64Map)            # 64-bit hashes of record ids
    sha_owner: U64Map = field(default_factory=U64Map)      # image sha prefix -> index in owners
    owners: list[tuple[str, str]] = field(default_factory=list)  # (patient, study) of stored images
    phash: imgs.PhashIndex | None = None                   # owners are indexes in owners
    rec_keys: U64Map = field(default_factory=U64Map)       # record dedupe key -> index in rec_ids
    rec_ids: list[str] = field(default_factory=list)
    patient_split: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    shards: dict[str, str] = field(default_factory=dict)        # rel -> sha256
    shard_marker: dict[str, str] = field(default_factory=dict)  # rel -> the marker that committed it
    images: U64Map = field(default_factory=U64Map)         # sha prefixes of the stored images (image_rel)
    reassigned: int = 0
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)

    def owner(self, owner: tuple[str, str]) -> int:
        """The index of ``owner`` in owners (consecutive images of one study share it)."""
        if not self.owners or self.owners[-1] != owner:
            self.owners.append(owner)
        return len(self.owners) - 1

    def add_image(self, sha: str, owner: int, ph: int | None) -> None:
        self.sha_owner.setdefault(_sha64(sha), owner)
        if self.phash is not None and ph is not None:
            self.phash.add(ph, owner)

    def add_rec_key(self, key: str, rid: str) -> None:
        if self.rec_keys.setdefault(_u64key(key), len(self.rec_ids)) == len(self.rec_ids):  # new: first rid wins
            self.rec_ids.append(rid)

    def rec_key_owner(self, key: str) -> str | None:
        i = self.rec_keys.get(_u64key(key))
        return None if i is None else self.rec_ids[i]

    def replay(self, m: dict[str, Any], tag: str, marker: str) -> None:
        self.ids.update(_u64(i) for i in m["ids"])
        local: dict[tuple[str, str], int] = {}  # one owners entry per study of this chunk

        def owner(o: tuple[str, str]) -> int:
            if o not in local:
                local[o] = self.owner(o)
            return local[o]

        for sha, o in m["shas"].items():
            if _sha64(sha) not in self.sha_owner:  # (a chunk just finished has added its own already)
                self.add_image(sha, owner(tuple(o)), None)
        for h, p, s in m["phashes"] if self.phash is not None else ():
            if int(h) not in self.phash:
                self.phash.add(int(h), owner((p, s)))
        for key, rid in m["rec_keys"].items():
            self.add_rec_key(key, rid)
        for pid, split in m["patients"].items():
            self.patient_split.setdefault(pid, split)
        for k, v in m["counts"].items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.quarantine.extend(m["quarantine"])
        self.shards.update(m["shards"])
        self.shard_marker.update({rel: marker for rel in m["shards"]})
        self.images.update(int(_IMAGE.match(rel)[1], 16) for rel in m["images"])
        self.reassigned += m["reassigned"]
        src = self.per_source.setdefault(tag, {"items": 0, "kept": 0, "quarantined": 0, "digests": []})
        src["items"] += m["items"]
        src["kept"] += sum(m["counts"].values())
        src["quarantined"] += len(m["quarantine"])
        src["digests"].append(m["digest"] + m["image_digest"])


# ---------------------------------------------------------------------------------------- sources and config

def resolve_sources(cfg: CurateConfig) -> list[SourceSpec]:
    """The config's sources, checked (names, roots, ratios, limits; not yet opened)."""
    if cfg.sources:
        out = []
        for i, s in enumerate(cfg.sources):
            where = f"curate config: sources[{i}]"
            if not isinstance(s, dict):
                raise ConfigError(f"{where}: expected a mapping with name/root/ratio/limit/options")
            unknown = sorted(set(s) - {"name", "root", "ratio", "limit", "options"})
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; known: name, root, ratio, limit, options")
            if not s.get("name"):
                raise ConfigError(f"{where}: key 'name' is required")
            if not isinstance(s.get("options") or {}, dict):
                raise ConfigError(f"{where}: 'options' must be a mapping")
            out.append(SourceSpec(i, str(s["name"]), str(s.get("root") or ""), s.get("ratio", cfg.ratio),
                                  s.get("limit", cfg.limit), dict(s.get("options") or {})))
    else:
        opts = dict(cfg.options)
        if cfg.source == "phantom":
            opts = {**{k: getattr(cfg, k) for k in _PHANTOM_KEYS}, **opts}
        out = [SourceSpec(0, cfg.source, cfg.root, cfg.ratio, cfg.limit, opts)]
    for s in out:
        where = f"curate config: source {s.name!r}"
        if not isinstance(s.ratio, (int, float)) or isinstance(s.ratio, bool) or not 0 < float(s.ratio) <= 1:
            raise ConfigError(f"{where}: 'ratio' must be a number in (0, 1], got {s.ratio!r}")
        if not isinstance(s.limit, int) or isinstance(s.limit, bool) or s.limit < 0:
            raise ConfigError(f"{where}: 'limit' must be a non-negative integer, got {s.limit!r}")
        try:
            cls = get_source(s.name)
        except KeyError as exc:
            raise ConfigError(f"{where}: {exc.args[0]}") from None
        if cls.needs_root and not s.root:
            raise ConfigError(f"{where}: 'root' (a folder or s3:// prefix holding the dataset) is required")
    checks = [
        (cfg.shard_size > 0, f"'shard_size' must be positive, got {cfg.shard_size}"),
        (cfg.workers >= 1, f"'workers' must be at least 1, got {cfg.workers}"),
        (-1 <= cfg.phash_distance <= 64, f"'phash_distance' must be -1 (off) or 0..64 bits of 256, got "
                                         f"{cfg.phash_distance}"),
        (0 <= cfg.png_compress_level <= 9, f"'png_compress_level' must be 0..9, got {cfg.png_compress_level}"),
        (cfg.max_pixels >= 32 * 32, f"'max_pixels' must be at least 1024, got {cfg.max_pixels}"),
        (cfg.max_image_pixels >= cfg.max_pixels, f"'max_image_pixels' must be at least max_pixels, got "
                                                 f"{cfg.max_image_pixels}"),
        (len(cfg.split_ratios) == len(SPLITS) and all(r >= 0 for r in cfg.split_ratios)
         and sum(cfg.split_ratios) > 0, f"'split_ratios' must be {len(SPLITS)} non-negative numbers (train, "
                                        f"validate, test) with a positive sum, got {cfg.split_ratios}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"curate config: {msg}")
    return out


def _open(spec: SourceSpec) -> tuple[Root | None, Source]:
    where = f"curate config: source {spec.name!r}"
    try:
        root = Root(spec.root) if spec.root else None
        return root, get_source(spec.name)(root, **spec.options)
    except (FileNotFoundError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _location(uri: str) -> tuple[str, str]:
    """(namespace, path) for overlap checks: ("local", resolved path) or ("s3:bucket", key prefix)."""
    if store.is_s3(uri):
        bucket, key = store.parse_s3(uri)
        return f"s3:{bucket}", "/" + key.strip("/")
    return "local", os.path.realpath(store.local_path(uri))


def _check_out(out_uri: str, specs: list[SourceSpec]) -> None:
    ns, out = _location(out_uri)
    for s in specs:
        uris = [s.root] + [v for k, v in s.options.items() if k.endswith("_root") and isinstance(v, str)]
        for uri in filter(None, uris):  # a source without a root (the phantom) reads nothing
            ns2, p = _location(uri)
            if ns2 == ns and (p == out or p.startswith(out.rstrip("/") + "/") or out.startswith(p.rstrip("/") + "/")):
                raise CurationError(f"--out {out_uri} overlaps the input {uri} of source {s.name}: curation "
                                    f"rewrites its output folder, so it must be separate from every dataset root")


def _u64(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def _sha64(sha: str) -> int:
    """An image's key in the state tables: the first 64 bits of its sha256 (its file name, image_rel)."""
    return int(sha[:16], 16)


def _u64key(key: str) -> int:
    """A record dedupe key (a hex digest) as 64 bits."""
    return int(key[:16], 16)


def seeded_split(patient_id: str, seed: int, ratios: list[float]) -> str:
    total = float(sum(ratios))
    u = _u64("split", str(seed), patient_id) / 2**64 * total
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r
        if u < acc:
            return name
    return SPLITS[-1]


def _stream(spec: SourceSpec, src: Source, seed: int) -> Iterator[Item | Quarantine]:
    kept = 0
    for x in src.items():
        if isinstance(x, Quarantine):
            yield x
            continue
        if spec.ratio < 1 and _u64("sample", str(seed), spec.name,
                                   str(getattr(x, "record_id", ""))) / 2**64 >= spec.ratio:
            continue
        if spec.limit and kept >= spec.limit:
            return
        kept += 1
        yield x


def _chunks(stream: Iterator[Item | Quarantine], size: int) -> Iterator[tuple[list[Item], list[Quarantine]]]:
    items: list[Item] = []
    qs: list[Quarantine] = []
    for x in stream:
        (qs if isinstance(x, Quarantine) else items).append(x)
        if len(items) >= size or len(qs) >= size:
            yield items, qs
            items, qs = [], []
    if items or qs:
        yield items, qs


# ------------------------------------------------------------------------------------------------- a chunk

def _digest(spec: SourceSpec, items: list[Item], qs: list[Quarantine]) -> str:
    """What the chunk was made from (metadata, texts, image paths or in-memory bytes, the adapter's refusals)."""
    d = hashlib.blake2b(digest_size=16)
    for it in items:
        refs = [r.path or (hashlib.sha1(r.data).hexdigest() if isinstance(r.data, bytes) else repr(r))
                for r in (it.images if isinstance(it.images, list) else [])]
        d.update(repr((spec.name, it.record_id, it.patient_id, it.study_id, it.task, it.prompt, it.answer, refs,
                       [(b.label, b.box) for b in it.boxes] if isinstance(it.boxes, list) else repr(it.boxes),
                       it.box_frame, it.split, it.view, it.question_type, it.findings)).encode())
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
    if not isinstance(it.boxes, list) or not all(isinstance(b, Box) for b in it.boxes):
        raise TypeError("field 'boxes' must be a list of Box")
    if not isinstance(it.findings, list) or not all(isinstance(f, str) for f in it.findings):
        raise TypeError("field 'findings' must be a list of text")


def _scale_boxes(item: Item, size: tuple[int, int], orig: tuple[int, int]) -> list[Box] | str:
    try:
        fw, fh = (float(v) for v in (item.box_frame or orig))
        if not (fw > 0 and fh > 0):
            return f"box frame {item.box_frame} is not a size"
        sx, sy = size[0] / fw, size[1] / fh
        out = []
        for b in item.boxes:
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
class _Prep:
    spec: SourceSpec
    k: int
    items: list[Item]
    digest: str
    marker: str
    bad: list[dict[str, str]]
    clean: list[tuple[Item, str, str, list[str]]]  # item, prompt, answer, image keys
    handle: Any = None


def _prepare(cfg: CurateConfig, spec: SourceSpec, k: int, items: list[Item], qs: list[Quarantine],
             root: Root | None, digest: str, marker: str) -> tuple[_Prep, list[tuple]]:
    """The chunk's state-free work: type checks, text cleaning, the image jobs."""
    prep = _Prep(spec, k, items, digest, marker, [q.to_dict() for q in qs], [])
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


def _drop(prep: _Prep, it: Item, file: str, reason: str) -> None:
    prep.bad.append({"source": prep.spec.name, "file": str(file or getattr(it, "file", "") or ""),
                     "reason": reason, "record": f"{prep.spec.name}/{getattr(it, 'record_id', '')}"})


def _finish(cfg: CurateConfig, prep: _Prep, results: dict[str, tuple], st: State) -> tuple[dict, dict]:
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
        if rid in ids or _u64(rid) in st.ids:
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
            i = st.sha_owner.get(_sha64(sha))
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
        if isinstance(boxes, str):
            _drop(prep, it, "", boxes)
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
                         boxes=boxes, findings=list(it.findings), trace=it.trace or "").validate()
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


def _parquet_bytes(records: list[Record]) -> bytes:
    from deepmedix.data.schema import ARROW_SCHEMA

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([r.to_row() for r in records], schema=ARROW_SCHEMA), buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- the run

FORMAT = 3  # bump when stored bytes, hashes or markers change: a run of another format is never resumed


def _config_hash(cfg: CurateConfig) -> str:
    d = to_dict(cfg)
    d.pop("workers", None)  # how many processes did the work does not change the dataset
    d["_format"] = FORMAT
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reason_head(reason: str) -> str:
    head = reason.split(" (")[0].split(":")[0]
    return " ".join(w for w in head.split() if not any(c.isdigit() for c in w) and "/" not in w)[:60]


def _kept_image(st: State, rel: str) -> bool:
    m = _IMAGE.match(rel)
    return bool(m) and int(m[1], 16) in st.images


_IMAGE = re.compile(r"^images/([0-9a-f]{16})\.png$")
_OURS = re.compile(r"^(images/[0-9a-f]{16}\.png|records/(train|validate|test)-\d{2,}-[a-z0-9_]+-\d{5,}\.parquet|"
                   r"(images|records)/\.[^/]+\.tmp-\d+)$")


def _load_marker(sink: Sink, rel: str) -> dict | None:
    try:
        m = json.loads(sink.get(rel) or b"")
    except ValueError:
        return None
    need = ("ids", "shas", "phashes", "rec_keys", "patients", "counts", "quarantine", "images", "reassigned",
            "items", "digest", "image_digest", "shards")
    return m if isinstance(m, dict) and all(k in m for k in need) else None


def curate(cfg: CurateConfig, out_uri: str, progress: Progress | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    t0 = time.time()
    specs = resolve_sources(cfg)
    _check_out(out_uri, specs)
    opened = [(spec, *_open(spec)) for spec in specs]  # every root and adapter checked before any write
    chash = _config_hash(cfg)
    sink = Sink(out_uri)
    work = f"{WORK}/{chash}"
    lineage = sink.get(store.LINEAGE)
    if lineage is not None:
        lin = json.loads(lineage)
        if lin.get("config_hash") == chash:
            for rel in sink.list(WORK):  # a run killed between its commit and its clean-up
                sink.delete(rel)
            m = json.loads(sink.get("manifest.json") or b"{}")
            return {"stage": "curate", "metric": "records", "before": 0, "after": m.get("total", 0),
                    "skipped": "dataset already complete for this config", "quarantined":
                    m.get("quarantine", {}).get("total", 0), "resumed_chunks": 0, "wall_s": time.time() - t0}
    sink.put(f"{work}/_started", json.dumps({"config_hash": chash}).encode())  # readers now refuse the folder
    if lineage is not None:
        sink.delete(store.LINEAGE)  # withdraw the old dataset's commit marker before rewriting it
    for rel in sink.list(WORK):
        if not rel.startswith(work + "/"):
            sink.delete(rel)
    with sigterm_exits():  # SIGTERM unwinds like Ctrl-C: the workers are stopped
        return _run(cfg, specs, opened, sink, chash, work, progress, log, t0)


def _run(cfg, specs, opened, sink: Sink, chash: str, work: str, progress, log, t0: float) -> dict[str, Any]:
    done = set(sink.list(work))
    present = sink.nonempty("records") | sink.nonempty("images") if len(done) > 1 else set()
    st = State(phash=imgs.PhashIndex(cfg.phash_distance) if cfg.dedupe_images and cfg.phash_distance >= 0 else None)
    settings = {"max_pixels": cfg.max_pixels, "max_image_pixels": cfg.max_image_pixels,
                "compress_level": cfg.png_compress_level}
    pool = ImagePool(cfg.workers, sink, settings)
    seen, resumed = 0, 0
    recomputed = False
    pending: _Prep | None = None

    def finish(prep: _Prep) -> None:
        nonlocal seen
        m, by_split = _finish(cfg, prep, pool.collect(prep.handle), st)
        for split, recs in sorted(by_split.items()):
            rel = f"records/{split}-{prep.spec.tag}-{prep.k:05d}.parquet"
            data = _parquet_bytes(recs)
            sink.put(rel, data)
            m["shards"][rel] = hashlib.sha256(data).hexdigest()
        sink.put(prep.marker, json.dumps(m).encode())
        st.replay(m, prep.spec.tag, prep.marker)
        seen += len(prep.items)
        if progress is not None:
            progress(seen, 0)

    try:
        for spec, root, src in opened:
            for k, (items, qs) in enumerate(_chunks(_stream(spec, src, cfg.seed), cfg.shard_size)):
                marker = f"{work}/{spec.tag}-{k:05d}.json"
                digest = _digest(spec, items, qs)
                m = _load_marker(sink, marker) if marker in done and not recomputed else None
                if m and m["digest"] == digest and set(m["shards"]) <= present and set(m["images"]) <= present:
                    if pending is not None:
                        finish(pending)
                        pending = None
                    st.replay(m, spec.tag, marker)
                    resumed += 1
                    seen += len(items)
                    continue
                recomputed = True  # every later chunk depends on this one's state: recompute those too
                prep, jobs = _prepare(cfg, spec, k, items, qs, root, digest, marker)
                prep.handle = pool.submit(jobs)
                if pending is not None:
                    finish(pending)
                pending = prep
        if pending is not None:
            finish(pending)
        pool.close()
    except BaseException:
        pool.kill()
        raise
    summary = _finalize(cfg, specs, st, sink, chash)
    summary.update({"resumed_chunks": resumed, "wall_s": round(time.time() - t0, 2)})
    if log:
        log(f"curate: {summary['after']} records kept, {summary['quarantined']} quarantined "
            f"({', '.join(f'{k}: {v}' for k, v in summary['quarantine_by_reason'].items()) or 'none'})")
    return summary


def _finalize(cfg: CurateConfig, specs: list[SourceSpec], st: State, sink: Sink, chash: str) -> dict[str, Any]:
    # the hard check: read back every shard's patient ids and splits
    where: dict[str, tuple[str, str]] = {}
    for rel in sorted(st.shards):
        data = sink.get(rel)
        if data is None or hashlib.sha256(data).hexdigest() != st.shards[rel]:
            sink.delete(st.shard_marker[rel])  # so that the rerun rewrites that chunk
            raise RecordError(f"{sink.uri}/{rel}: shard missing or changed since it was written; rerun to "
                              f"rewrite it")
        t = pq.read_table(io.BytesIO(data), columns=["patient_id", "split"]).to_pydict()
        for pid, split in zip(t["patient_id"], t["split"]):
            if where.setdefault(pid, (split, rel))[0] != split:
                for m in set(st.shard_marker.values()):
                    sink.delete(m)  # the rerun recomputes everything rather than replaying this
                raise RecordError(f"patient {pid} is in split {where[pid][0]} ({where[pid][1]}) and in {split} "
                                  f"({rel}): splits must be patient-disjoint")
    stale = [rel for rel in sink.names("records") if rel not in st.shards and _OURS.match(rel)]
    stale += [rel for rel in sink.names("images")  # only our own names: a stranger's file stays
              if _OURS.match(rel) and not _kept_image(st, rel)]
    for rel in stale:
        sink.delete(rel)

    by_reason: dict[str, int] = {}
    by_source: dict[str, int] = {}
    for q in st.quarantine:
        by_reason[_reason_head(q["reason"])] = by_reason.get(_reason_head(q["reason"]), 0) + 1
        by_source[q["source"]] = by_source.get(q["source"], 0) + 1
    sink.put("quarantine.jsonl", "".join(json.dumps(q, sort_keys=True) + "\n" for q in st.quarantine).encode())

    patients: dict[str, int] = {}
    for split in where.values():
        patients[split[0]] = patients.get(split[0], 0) + 1
    sources = []
    for s in specs:
        ps = st.per_source.get(s.tag, {"items": 0, "kept": 0, "quarantined": 0, "digests": []})
        sources.append({"name": s.name, "root": s.root, "ratio": s.ratio, "limit": s.limit, "options": s.options,
                        "items": ps["items"], "kept": ps["kept"], "quarantined": ps["quarantined"],
                        "input_hash": hashlib.sha256("".join(ps["digests"]).encode()).hexdigest()})
    total = sum(st.counts.values())
    man = {"counts": dict(sorted(st.counts.items())), "total": total,
           "patients_per_split": dict(sorted(patients.items())), "images": len(st.images),
           "quarantine": {"total": len(st.quarantine), "by_reason": dict(sorted(by_reason.items())),
                          "by_source": dict(sorted(by_source.items()))},
           "split_reassigned": st.reassigned, "sources": sources, "config": to_dict(cfg), "config_hash": chash}
    sink.put("manifest.json", (json.dumps(man, indent=2, sort_keys=True) + "\n").encode())

    content = hashlib.sha256("".join(f"{r}:{h}\n" for r, h in sorted(st.shards.items())).encode())
    for k in st.images:  # ascending, so the same order as the sorted file names
        content.update(imgs.image_rel(f"{k:016x}").encode())
    content = content.hexdigest()
    lineage = {"stage": "curate", "config": to_dict(cfg), "config_hash": chash, "code_version": store.code_version(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "inputs": {f"{i:02d}-{s['name']}": {"uri": s["root"], "sha256": s["input_hash"]}
                          for i, s in enumerate(sources)},
               "sha256": content, "manifest": {k: man[k] for k in ("counts", "total", "patients_per_split")}}
    sink.put(store.LINEAGE, (json.dumps(lineage, indent=2, sort_keys=True) + "\n").encode())
    for rel in sink.list(WORK):
        sink.delete(rel)
    if not sink.s3:
        import shutil

        shutil.rmtree(sink.path / WORK, ignore_errors=True)
    return {"stage": "curate", "metric": "records", "before": 0, "after": total,
            "patients_per_split": man["patients_per_split"], "images": len(st.images),
            "quarantined": len(st.quarantine), "quarantine_by_reason": man["quarantine"]["by_reason"],
            "counts": man["counts"]}
