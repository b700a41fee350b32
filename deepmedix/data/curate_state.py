"""What the curation engine (:mod:`deepmedix.data.curate`) knows across chunks, and its sources as configured.

``SourceSpec`` is one configured source; ``State`` holds what later chunks must know of earlier ones (compact
tables of record ids, image owners, perceptual hashes, dedupe keys and patient splits), filled as each chunk is
finished or replayed from its marker. ``resolve_sources`` checks the config's sources, ``open_source`` opens one,
``check_out`` keeps the output away from every input; ``seeded_split`` is the hash split of patients without an
official one, and ``sampled_stream`` / ``chunks`` cut a source's Items into the chunks the engine works on.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from deepmedix import store
from deepmedix.config import ConfigError, CurateConfig
from deepmedix.data import images as imgs
from deepmedix.data.compact import U64Map
from deepmedix.data.schema import SPLITS
from deepmedix.data.sources import Item, Quarantine, Root, Source, get_source
from deepmedix.errors import CurationError

_PHANTOM_KEYS = ("n_patients", "studies_per_patient", "image_size", "vqa_per_study", "split_ratios", "seed",
                 "n_studies")
IMAGE_RE = re.compile(r"^images/([0-9a-f]{16})\.png$")


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
        self.sha_owner.setdefault(sha64(sha), owner)
        if self.phash is not None and ph is not None:
            self.phash.add(ph, owner)

    def add_rec_key(self, key: str, rid: str) -> None:
        if self.rec_keys.setdefault(_u64key(key), len(self.rec_ids)) == len(self.rec_ids):  # new: first rid wins
            self.rec_ids.append(rid)

    def rec_key_owner(self, key: str) -> str | None:
        i = self.rec_keys.get(_u64key(key))
        return None if i is None else self.rec_ids[i]

    def replay(self, m: dict[str, Any], tag: str, marker: str) -> None:
        self.ids.update(u64(i) for i in m["ids"])
        local: dict[tuple[str, str], int] = {}  # one owners entry per study of this chunk

        def owner(o: tuple[str, str]) -> int:
            if o not in local:
                local[o] = self.owner(o)
            return local[o]

        for sha, o in m["shas"].items():
            if sha64(sha) not in self.sha_owner:  # (a chunk just finished has added its own already)
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
        self.images.update(int(IMAGE_RE.match(rel)[1], 16) for rel in m["images"])
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


def open_source(spec: SourceSpec) -> tuple[Root | None, Source]:
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


def check_out(out_uri: str, specs: list[SourceSpec]) -> None:
    ns, out = _location(out_uri)
    for s in specs:
        uris = [s.root] + [v for k, v in s.options.items() if k.endswith("_root") and isinstance(v, str)]
        for uri in filter(None, uris):  # a source without a root (the phantom) reads nothing
            ns2, p = _location(uri)
            if ns2 == ns and (p == out or p.startswith(out.rstrip("/") + "/") or out.startswith(p.rstrip("/") + "/")):
                raise CurationError(f"--out {out_uri} overlaps the input {uri} of source {s.name}: curation "
                                    f"rewrites its output folder, so it must be separate from every dataset root")


def u64(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def sha64(sha: str) -> int:
    """An image's key in the state tables: the first 64 bits of its sha256 (its file name, image_rel)."""
    return int(sha[:16], 16)


def _u64key(key: str) -> int:
    """A record dedupe key (a hex digest) as 64 bits."""
    return int(key[:16], 16)


def seeded_split(patient_id: str, seed: int, ratios: list[float]) -> str:
    total = float(sum(ratios))
    u = u64("split", str(seed), patient_id) / 2**64 * total
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r
        if u < acc:
            return name
    return SPLITS[-1]


def sampled_stream(spec: SourceSpec, src: Source, seed: int) -> Iterator[Item | Quarantine]:
    kept = 0
    for x in src.items():
        if isinstance(x, Quarantine):
            yield x
            continue
        if spec.ratio < 1 and u64("sample", str(seed), spec.name,
                                  str(getattr(x, "record_id", ""))) / 2**64 >= spec.ratio:
            continue
        if spec.limit and kept >= spec.limit:
            return
        kept += 1
        yield x


def chunks(stream: Iterator[Item | Quarantine], size: int) -> Iterator[tuple[list[Item], list[Quarantine]]]:
    items: list[Item] = []
    qs: list[Quarantine] = []
    for x in stream:
        (qs if isinstance(x, Quarantine) else items).append(x)
        if len(items) >= size or len(qs) >= size:
            yield items, qs
            items, qs = [], []
    if items or qs:
        yield items, qs
