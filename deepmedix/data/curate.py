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

A rerun with the same config skips chunks whose marker exists (their state is replayed from the marker) and so
finishes an interrupted run. At the end: ``quarantine.jsonl``, ``manifest.json``, unreferenced images and stale
shards removed, the no-patient-in-two-splits check over the written shards, then ``lineage.json`` — the commit
marker of the whole dataset — and ``_work/`` is removed. Nothing is loaded whole: memory is bounded by one chunk
plus the dedupe indexes (a few dozen bytes per image and record).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from deepmedix import store
from deepmedix.config import ConfigError, CurateConfig, to_dict
from deepmedix.data import images as imgs
from deepmedix.data import text as txt
from deepmedix.data.schema import SPLITS, Box, Record, RecordError
from deepmedix.data.sources import BadInput, Item, Quarantine, Root, get_source

Progress = Callable[[int, int], None]
WORK = "_work"
_PHANTOM_KEYS = ("n_patients", "studies_per_patient", "image_size", "vqa_per_study", "split_ratios", "seed",
                 "n_studies")


# ------------------------------------------------------------------------------------------------ the sink

class Sink:
    """The output dataset: a local folder or an ``s3://`` prefix. Every file is written atomically (a temporary
    name then ``os.replace`` locally; one PUT on S3, which is never visible half-written)."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.s3 = store.is_s3(self.uri)
        self._client = None
        self._has: set[str] = set()
        if self.s3:
            self.bucket, self.prefix = store.parse_s3(self.uri)
        else:
            self.path = store.local_path(self.uri)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_client"], d["_has"] = None, set()
        return d

    @property
    def client(self):
        if self._client is None:
            self._client = store.s3_client()
            with store.s3_errors(self.uri):
                if not self._client.bucket_exists(self.bucket):
                    self._client.make_bucket(self.bucket)
        return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def put(self, rel: str, data: bytes) -> None:
        if self.s3:
            with store.s3_errors(f"{self.uri}/{rel}"):
                self.client.put_object(self.bucket, self._key(rel), io.BytesIO(data), len(data))
            return
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def put_once(self, rel: str, data: bytes) -> None:
        """Content-addressed files: written once, then known to exist."""
        if rel in self._has:
            return
        if self.s3 or not (self.path / rel).exists():
            self.put(rel, data)
        self._has.add(rel)

    def get(self, rel: str) -> bytes | None:
        if self.s3:
            from minio.error import S3Error

            with store.s3_errors(f"{self.uri}/{rel}"):
                try:
                    r = self.client.get_object(self.bucket, self._key(rel))
                except S3Error as exc:
                    if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                        return None
                    raise
                try:
                    return r.read()
                finally:
                    r.close()
                    r.release_conn()
        p = self.path / rel
        return p.read_bytes() if p.is_file() else None

    def list(self, rel_dir: str) -> list[str]:
        if self.s3:
            pfx = self._key(rel_dir.strip("/")) + "/"
            with store.s3_errors(self.uri):
                return sorted(o.object_name[len(self.prefix) + 1 if self.prefix else 0:]
                              for o in self.client.list_objects(self.bucket, prefix=pfx, recursive=True))
        base = self.path / rel_dir
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, rel: str) -> None:
        if self.s3:
            with store.s3_errors(f"{self.uri}/{rel}"):
                self.client.remove_object(self.bucket, self._key(rel))
            return
        try:
            (self.path / rel).unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------- the workers

_W: dict[str, Any] = {}


def _init_worker(sink: Sink, settings: dict[str, int]) -> None:
    _W["sink"], _W["settings"] = sink, settings


def _work(job: tuple) -> tuple[str, tuple]:
    """Decode, check, resize, encode and store one image. Returns (key, ("ok", ...)) or (key, ("bad", file,
    reason)). Store failures are not the input's fault: they propagate and stop the run."""
    key, root, path, data, name = job
    s = _W["settings"]
    label = path or name
    try:
        if data is None:
            data = root.read_bytes(path)
        p = imgs.process(data, label, s["max_pixels"], s["max_image_pixels"], s["compress_level"])
    except BadInput as exc:
        return key, ("bad", exc.file if root is None else f"{root.uri}/{exc.file}", exc.reason)
    except MemoryError:
        return key, ("bad", label, "image too large to decode in memory")
    _W["sink"].put_once(p.rel, p.png)
    return key, ("ok", p.sha, p.size, p.orig_size, p.phash)


class _Pool:
    def __init__(self, workers: int, sink: Sink, settings: dict[str, int]):
        self.pool = None
        _init_worker(sink, settings)
        if workers > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(sink, settings))

    def map(self, jobs: list[tuple]) -> dict[str, tuple]:
        if self.pool is None:
            return dict(map(_work, jobs))
        return dict(self.pool.imap_unordered(_work, jobs, chunksize=2))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def kill(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


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
    ids: set[str] = field(default_factory=set)
    sha_owner: dict[str, str] = field(default_factory=dict)
    phash: imgs.PhashIndex | None = None
    rec_keys: dict[str, str] = field(default_factory=dict)
    patient_split: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    shards: dict[str, str] = field(default_factory=dict)   # rel -> sha256
    images: set[str] = field(default_factory=set)
    reassigned: int = 0
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)

    def replay(self, m: dict[str, Any], tag: str) -> None:
        self.ids.update(m["ids"])
        self.sha_owner.update(m["shas"])
        if self.phash is not None:
            for h, owner in m["phashes"]:
                self.phash.add(int(h), owner)
        self.rec_keys.update(m["rec_keys"])
        self.patient_split.update(m["patients"])
        for k, v in m["counts"].items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.quarantine.extend(m["quarantine"])
        self.shards.update(m["shards"])
        self.images.update(m["images"])
        self.reassigned += m["reassigned"]
        src = self.per_source.setdefault(tag, {"items": 0, "kept": 0, "quarantined": 0, "digests": []})
        src["items"] += m["items"]
        src["kept"] += sum(m["counts"].values())
        src["quarantined"] += len(m["quarantine"])
        src["digests"].append(m["digest"])


def resolve_sources(cfg: CurateConfig) -> list[SourceSpec]:
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
            out.append(SourceSpec(i, str(s["name"]), str(s.get("root") or ""), s.get("ratio", 1.0),
                                  s.get("limit", 0), dict(s.get("options") or {})))
    else:
        opts = dict(cfg.options)
        if cfg.source == "phantom":
            opts = {**{k: getattr(cfg, k) for k in _PHANTOM_KEYS}, **opts}
        out = [SourceSpec(0, cfg.source, cfg.root, cfg.ratio, cfg.limit, opts)]
    for s in out:
        where = f"curate config: source {s.name!r}"
        if not isinstance(s.ratio, (int, float)) or isinstance(s.ratio, bool) or not 0 < float(s.ratio) <= 1:
            raise ConfigError(f"{where}: 'ratio' must be a number in (0, 1], got {s.ratio!r}")
        if not isinstance(s.limit, int) or s.limit < 0:
            raise ConfigError(f"{where}: 'limit' must be a non-negative integer, got {s.limit!r}")
        try:
            cls = get_source(s.name)
        except KeyError as exc:
            raise ConfigError(f"{where}: {exc.args[0]}") from None
        if cls.needs_root and not s.root:
            raise ConfigError(f"{where}: 'root' (a folder or s3:// prefix holding the dataset) is required")
    if not 0 < cfg.shard_size:
        raise ConfigError(f"curate config: 'shard_size' must be positive, got {cfg.shard_size}")
    if not -1 <= cfg.phash_distance <= 64:
        raise ConfigError(f"curate config: 'phash_distance' must be -1 (off) or 0..64 bits of 256, "
                          f"got {cfg.phash_distance}")
    return out


def _u64(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def seeded_split(patient_id: str, seed: int, ratios: list[float]) -> str:
    total = float(sum(ratios))
    u = _u64("split", str(seed), patient_id) / 2**64 * total
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r
        if u < acc:
            return name
    return SPLITS[-1]


def _stream(spec: SourceSpec, seed: int) -> Iterator[Item | Quarantine]:
    cls = get_source(spec.name)
    try:
        root = Root(spec.root) if spec.root else None
    except FileNotFoundError as exc:
        raise ConfigError(f"curate config: source {spec.name!r}: {exc}") from None
    try:
        src = cls(root, **spec.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"curate config: source {spec.name!r}: {exc}") from None
    kept = 0
    for x in src.items():
        if isinstance(x, Quarantine):
            yield x
            continue
        if spec.ratio < 1 and _u64("sample", str(seed), spec.name, x.record_id) / 2**64 >= spec.ratio:
            continue
        if spec.limit and kept >= spec.limit:
            return
        kept += 1
        yield x


def _chunks(stream: Iterator[Item | Quarantine], size: int) -> Iterator[tuple[list[Item], list[Quarantine]]]:
    items: list[Item] = []
    qs: list[Quarantine] = []
    for x in stream:
        if isinstance(x, Quarantine):
            qs.append(x)
            continue
        items.append(x)
        if len(items) >= size:
            yield items, qs
            items, qs = [], []
    if items or qs:
        yield items, qs


# ------------------------------------------------------------------------------------------------- a chunk

def _ref_key(item_root: Root | None, ref) -> tuple[str, tuple]:
    if ref.data is not None:
        k = "mem:" + hashlib.sha1(ref.data).hexdigest()
        return k, (k, None, "", ref.data, ref.name or "<in-memory image>")
    root = ref.root or item_root
    k = f"{root.uri}|{ref.path}"
    return k, (k, root, ref.path, None, ref.path)


def _scale_boxes(item: Item, size: tuple[int, int], orig: tuple[int, int]) -> list[Box] | str:
    fw, fh = item.box_frame or orig
    if fw <= 0 or fh <= 0:
        return f"box frame {fw}x{fh} is not a size"
    sx, sy = size[0] / fw, size[1] / fh
    out = []
    for b in item.boxes:
        x1, y1, x2, y2 = (float(v) for v in b.box)
        if not (x1 < x2 and y1 < y2):
            return f"box {b.label!r} {list(b.box)} has no area"
        if x2 <= 0 or y2 <= 0 or x1 >= fw or y1 >= fh:
            return f"box {b.label!r} {list(b.box)} lies outside the {fw}x{fh} image"
        nb = [max(0.0, x1 * sx), max(0.0, y1 * sy), min(size[0], x2 * sx), min(size[1], y2 * sy)]
        if not (nb[0] < nb[2] and nb[1] < nb[3]):
            return f"box {b.label!r} {list(b.box)} vanishes at {size[0]}x{size[1]}"
        out.append(Box(b.label, [round(v, 2) for v in nb]))
    return out


def _process_chunk(cfg: CurateConfig, spec: SourceSpec, items: list[Item], qs: list[Quarantine], st: State,
                   pool: _Pool, sink: Sink, root: Root | None) -> dict[str, Any]:
    bad: list[dict[str, str]] = [q.to_dict() for q in qs]
    digest = hashlib.blake2b(digest_size=16)

    def drop(item: Item, file: str, reason: str) -> None:
        bad.append({"source": spec.name, "file": file or item.file, "reason": reason,
                    "record": f"{spec.name}/{item.record_id}"})

    ids: set[str] = set()
    clean: list[tuple[Item, str, str]] = []
    for it in items:
        rid = f"{spec.name}/{it.record_id}"
        digest.update(json.dumps([rid, [r.path or r.name for r in it.images], it.prompt, it.answer,
                                  [b.to_dict() for b in it.boxes], it.split], sort_keys=True).encode())
        if rid in st.ids or rid in ids:
            drop(it, it.file, f"duplicate record id {rid}")
            continue
        ids.add(rid)
        clean_t = txt.clean_report_text if cfg.scrub_phi else txt.normalize
        prompt, answer = clean_t(it.prompt or ""), clean_t(it.answer or "")
        if not prompt:
            drop(it, it.file, "empty prompt text")
        elif not answer:
            drop(it, it.file, "empty answer text")
        elif not it.images:
            drop(it, it.file, "no image")
        else:
            clean.append((it, prompt, answer))

    jobs: dict[str, tuple] = {}
    for it, _, _ in clean:
        for ref in it.images:
            k, job = _ref_key(root, ref)
            jobs.setdefault(k, job)
    results = pool.map(list(jobs.values()))

    kept: list[Record] = []
    new_sha: dict[str, str] = {}
    new_ph: list[tuple[int, str]] = []
    new_keys: dict[str, str] = {}
    new_pat: dict[str, str] = {}
    reassigned = 0
    for it, prompt, answer in clean:
        rid = f"{spec.name}/{it.record_id}"
        res = [results[_ref_key(root, r)[0]] for r in it.images]
        failed = [r for r in res if r[0] == "bad"]
        if failed:
            drop(it, failed[0][1], failed[0][2])
            continue
        owner = f"{it.patient_id}|{it.study_id}"
        dup = None
        for _, sha, _, _, ph in (res if cfg.dedupe_images else []):
            o = st.sha_owner.get(sha) or new_sha.get(sha)
            if o is not None and o != owner:
                dup = f"duplicate image: identical to an image of study {o.split('|')[1]}"
                break
            if st.phash is not None:  # follow-up studies of one patient may look alike: only across patients
                hit = st.phash.find(ph)
                if hit is not None and hit[1].split("|")[0] != it.patient_id:
                    dup = (f"near-duplicate image (perceptual hash distance {(hit[0] ^ ph).bit_count()}) of an "
                           f"image of study {hit[1].split('|')[1]} of another patient")
                    break
        if dup:
            drop(it, it.images[0].label(), dup)
            continue
        boxes = _scale_boxes(it, res[0][2], res[0][3]) if it.boxes else []
        if isinstance(boxes, str):
            drop(it, it.file, boxes)
            continue
        split = it.split or seeded_split(it.patient_id, cfg.seed, cfg.split_ratios)
        if split not in SPLITS:
            drop(it, it.file, f"split {split!r} is not one of {SPLITS}")
            continue
        placed = st.patient_split.get(it.patient_id) or new_pat.get(it.patient_id)
        if placed and placed != split:
            split = placed
            reassigned += 1
        rel_imgs = [imgs.image_rel(r[1]) for r in res]
        key = "|".join([it.task, ",".join(sorted(rel_imgs)), txt.dedupe_key(prompt), txt.dedupe_key(answer),
                        json.dumps([[b.label, [round(v, 1) for v in b.box]] for b in boxes])])
        key = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        if cfg.dedupe_texts and (key in st.rec_keys or key in new_keys):
            drop(it, it.file, f"duplicate record: same images, prompt, answer and boxes as {st.rec_keys.get(key) or new_keys[key]}")
            continue
        try:
            rec = Record(record_id=rid, patient_id=it.patient_id, study_id=it.study_id, source=spec.name,
                         images=rel_imgs, image_sizes=[list(r[2]) for r in res], task=it.task, prompt=prompt,
                         answer=answer, split=split, view=it.view, question_type=it.question_type, boxes=boxes,
                         findings=list(it.findings), trace=it.trace).validate()
        except RecordError as exc:
            drop(it, it.file, str(exc))
            continue
        kept.append(rec)
        new_keys[key] = rid
        new_pat.setdefault(it.patient_id, split)
        for _, sha, _, _, ph in res:
            new_sha.setdefault(sha, owner)
            new_ph.append((ph, owner))
            if st.phash is not None:
                st.phash.add(ph, owner)  # later records in this chunk see it; replay re-adds idempotently

    shards: dict[str, str] = {}
    counts: dict[str, int] = {}
    by_split: dict[str, list[Record]] = {}
    for r in kept:
        by_split.setdefault(r.split, []).append(r)
        counts[f"{r.source}/{r.task}/{r.split}"] = counts.get(f"{r.source}/{r.task}/{r.split}", 0) + 1
    return {"bad": bad, "kept": kept, "by_split": by_split, "counts": counts, "shards": shards,
            "marker": {"ids": sorted(ids), "shas": new_sha, "phashes": [[str(h), o] for h, o in new_ph],
                       "rec_keys": new_keys, "patients": new_pat, "counts": counts, "quarantine": bad,
                       "images": sorted({i for r in kept for i in r.images}), "reassigned": reassigned,
                       "items": len(items), "digest": digest.hexdigest()}}


def _parquet_bytes(records: list[Record]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepmedix.data.schema import ARROW_SCHEMA

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([r.to_row() for r in records], schema=ARROW_SCHEMA), buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- the run

def _config_hash(cfg: CurateConfig) -> str:
    d = to_dict(cfg)
    d.pop("workers", None)  # how many processes did the work does not change the dataset
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reason_head(reason: str) -> str:
    head = reason.split(" (")[0].split(":")[0]
    return " ".join(w for w in head.split() if not any(c.isdigit() for c in w) and "/" not in w)[:60]


def curate(cfg: CurateConfig, out_uri: str, progress: Progress | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    t0 = time.time()
    specs = resolve_sources(cfg)
    chash = _config_hash(cfg)
    sink = Sink(out_uri)
    lineage = sink.get(store.LINEAGE)
    if lineage is not None:
        lin = json.loads(lineage)
        if lin.get("config_hash") == chash:
            m = json.loads(sink.get("manifest.json") or b"{}")
            return {"stage": "curate", "metric": "records", "before": 0, "after": m.get("total", 0),
                    "skipped": "dataset already complete for this config", "quarantined":
                    m.get("quarantine", {}).get("total", 0), "wall_s": time.time() - t0}
        sink.delete(store.LINEAGE)  # withdraw the old dataset's commit marker before rewriting it
    work = f"{WORK}/{chash}"
    for rel in sink.list(WORK):
        if not rel.startswith(work + "/"):
            sink.delete(rel)
    done_markers = set(sink.list(work))
    present = set(sink.list("records")) | set(sink.list("images")) if done_markers else set()

    st = State(phash=imgs.PhashIndex(cfg.phash_distance) if cfg.dedupe_images and cfg.phash_distance >= 0 else None)
    settings = {"max_pixels": cfg.max_pixels, "max_image_pixels": cfg.max_image_pixels,
                "compress_level": cfg.png_compress_level}
    pool = _Pool(cfg.workers, sink, settings)
    seen = 0
    resumed = 0
    try:
        for spec in specs:
            root = Root(spec.root) if spec.root else None
            for k, (items, qs) in enumerate(_chunks(_stream(spec, cfg.seed), cfg.shard_size)):
                marker = f"{work}/{spec.tag}-{k:05d}.json"
                m = json.loads(sink.get(marker) or b"{}") if marker in done_markers else {}
                if m and set(m["shards"]) <= present and set(m["images"]) <= present:
                    st.replay(m, spec.tag)
                    resumed += 1
                else:  # not done, or done but its files did not survive (a store that lost writes): redo
                    out = _process_chunk(cfg, spec, items, qs, st, pool, sink, root)
                    m = out["marker"]
                    m["shards"] = {}
                    for split, recs in out["by_split"].items():
                        rel = f"records/{split}-{spec.tag}-{k:05d}.parquet"
                        data = _parquet_bytes(recs)
                        sink.put(rel, data)
                        m["shards"][rel] = hashlib.sha256(data).hexdigest()
                    sink.put(marker, json.dumps(m).encode())
                    st.replay(m, spec.tag)
                seen += len(items)
                if progress is not None:
                    progress(seen, 0)
        pool.close()
    except BaseException:
        pool.kill()
        raise
    summary = _finalize(cfg, specs, st, sink, chash, work)
    summary.update({"resumed_chunks": resumed, "wall_s": round(time.time() - t0, 2)})
    if log:
        log(f"curate: {summary['after']} records kept, {summary['quarantined']} quarantined "
            f"({', '.join(f'{k}: {v}' for k, v in summary['quarantine_by_reason'].items()) or 'none'})")
    return summary


def _finalize(cfg: CurateConfig, specs: list[SourceSpec], st: State, sink: Sink, chash: str,
              work: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    # the hard check: read back every shard's patient ids and splits
    where: dict[str, tuple[str, str]] = {}
    for rel in sorted(st.shards):
        data = sink.get(rel)
        if data is None or hashlib.sha256(data).hexdigest() != st.shards[rel]:
            raise RecordError(f"{sink.uri}/{rel}: shard missing or changed since it was written; rerun curation")
        t = pq.read_table(io.BytesIO(data), columns=["patient_id", "split"]).to_pydict()
        for pid, split in zip(t["patient_id"], t["split"]):
            if where.setdefault(pid, (split, rel))[0] != split:
                raise RecordError(f"patient {pid} is in split {where[pid][0]} ({where[pid][1]}) and in {split} "
                                  f"({rel}): splits must be patient-disjoint")
    for rel in sink.list("records"):
        if rel not in st.shards:
            sink.delete(rel)
    for rel in sink.list("images"):
        if rel not in st.images:
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

    content = hashlib.sha256("".join(f"{r}:{h}\n" for r, h in sorted(st.shards.items())).encode()
                             + "".join(sorted(st.images)).encode()).hexdigest()
    lineage = {"stage": "curate", "config": to_dict(cfg), "config_hash": chash, "code_version": store.code_version(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "inputs": {f"{s['name']}": {"uri": s["root"], "sha256": s["input_hash"]} for s in sources},
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
