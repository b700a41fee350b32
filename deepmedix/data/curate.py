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
import re
import shutil
import time
from typing import Any, Callable

import pyarrow.parquet as pq

from deepmedix import store
from deepmedix.config import CurateConfig, to_dict
from deepmedix.data import images as imgs
from deepmedix.data.curate_chunk import Prep, chunk_digest, finish_chunk, parquet_bytes, prepare_chunk
from deepmedix.data.curate_state import (
    IMAGE_RE,
    SourceSpec,
    State,
    check_out,
    chunks,
    open_source,
    resolve_sources,
    sampled_stream,
)
from deepmedix.data.schema import RecordError
from deepmedix.data.sink import Sink
from deepmedix.data.workers import ImagePool
from deepmedix.errors import sigterm_exits

Progress = Callable[[int, int], None]
WORK = "_work"
FORMAT = 3  # bump when stored bytes, hashes or markers change: a run of another format is never resumed


def _config_hash(cfg: CurateConfig) -> str:
    d = to_dict(cfg)
    d.pop("workers", None)  # how many processes did the work does not change the dataset
    d["_format"] = FORMAT
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reason_head(reason: str) -> str:
    """The kind of a quarantine reason, for the summary: its first clause without numbers or paths (and without the
    ``line N: `` a manifest row's reason starts with, which would put every such row under "line")."""
    head = re.sub(r"^(line|row) \d+: ", "", reason).split(" (")[0].split(":")[0]
    return " ".join(w for w in head.split() if not any(c.isdigit() for c in w) and "/" not in w)[:60]


def _kept_image(st: State, rel: str) -> bool:
    m = IMAGE_RE.match(rel)
    return bool(m) and int(m[1], 16) in st.images


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
    check_out(out_uri, specs)
    opened = [(spec, *open_source(spec)) for spec in specs]  # every root and adapter checked before any write
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
    for rel in sink.list("card"):  # and any card of an earlier dataset here (deepmedix.data.card.publish_card)
        sink.delete(rel)
    if not sink.s3 and (sink.path / "card").is_dir():
        shutil.rmtree(sink.path / "card", ignore_errors=True)
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
    pending: Prep | None = None

    def finish(prep: Prep) -> None:
        nonlocal seen
        m, by_split = finish_chunk(cfg, prep, pool.collect(prep.handle), st)
        for split, recs in sorted(by_split.items()):
            rel = f"records/{split}-{prep.spec.tag}-{prep.k:05d}.parquet"
            data = parquet_bytes(recs)
            sink.put(rel, data)
            m["shards"][rel] = hashlib.sha256(data).hexdigest()
        sink.put(prep.marker, json.dumps(m).encode())
        st.replay(m, prep.spec.tag, prep.marker)
        seen += len(prep.items)
        if progress is not None:
            progress(seen, 0)

    try:
        for spec, root, src in opened:
            for k, (items, qs) in enumerate(chunks(sampled_stream(spec, src, cfg.seed), cfg.shard_size)):
                marker = f"{work}/{spec.tag}-{k:05d}.json"
                digest = chunk_digest(spec, items, qs)
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
                prep, jobs = prepare_chunk(cfg, spec, k, items, qs, root, digest, marker)
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
        shutil.rmtree(sink.path / WORK, ignore_errors=True)
    return {"stage": "curate", "metric": "records", "before": 0, "after": total,
            "patients_per_split": man["patients_per_split"], "images": len(st.images),
            "quarantined": len(st.quarantine), "quarantine_by_reason": man["quarantine"]["by_reason"],
            "counts": man["counts"]}
