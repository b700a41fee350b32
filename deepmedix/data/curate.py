"""Curation: sources -> Records in the store (Parquet shards per split, images, manifest, lineage).

The embedded default source is the procedurally generated phantom CXR set.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import CurateConfig
from deepmedix.data.schema import dump_json, iter_splits, manifest, write_shard


def curate(cfg: CurateConfig, out_uri: str, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    if cfg.source != "phantom":
        raise ValueError(f"curate: unknown source {cfg.source!r}; this build knows 'phantom'")
    from deepmedix.data import phantom

    t0 = time.time()
    with store.atomic_dir(out_uri) as out:
        records = phantom.generate(out, n_patients=cfg.n_patients, studies_per_patient=tuple(cfg.studies_per_patient),
                                   size=cfg.image_size, seed=cfg.seed, split_ratios=tuple(cfg.split_ratios),
                                   vqa_per_study=cfg.vqa_per_study, progress=progress)
        (out / "records").mkdir()
        for split, recs in iter_splits(records):
            for i in range(0, len(recs), cfg.records_per_shard):
                write_shard(recs[i:i + cfg.records_per_shard],
                            out / "records" / f"{split}-{i // cfg.records_per_shard:05d}.parquet")
        summary = manifest(records)
        dump_json(summary, out / "manifest.json")
        store.write_lineage(out, "curate", cfg, extra={"manifest": summary})
    return {"stage": "curate", "metric": "records", "before": 0, "after": summary["total"],
            "patients_per_split": summary["patients_per_split"], "wall_s": time.time() - t0}
