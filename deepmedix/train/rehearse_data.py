"""The training data path's memory at scale, on a CPU (``deepmedix rehearse``): synthetic datasets of a small and
a large number of records go through what SFT does with them — records chosen by id and read a shard at a time,
samples written to an Arrow file, images decoded per batch, the processor making a batch — each in its own
process, whose peak resident memory is compared. A path that holds something per record grows with the dataset;
a streaming one does not.

``python -m deepmedix.train.rehearse_data DATA MODEL BATCHES`` runs one measurement and prints it as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from deepmedix.data.records import iter_records, plain_target, select_ids
from deepmedix.data.schema import TASKS, Box, Record, write_shard

SHARD = 2000
IMAGES = 4
FRAME = 512


def synthetic_dataset(out: Path, n: int) -> Path:
    """``n`` train records of the four tasks in shards of :data:`SHARD`, sharing :data:`IMAGES` 512x512 images."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(exist_ok=True)
    for k in range(IMAGES):
        Image.new("L", (FRAME, FRAME), 40 * k).save(out / "images" / f"{k}.png")

    def record(i: int) -> Record:
        task = TASKS[i % len(TASKS)]
        return Record(record_id=f"syn-{i:08d}", patient_id=f"syn-p{i}", study_id=f"syn-s{i}", source="synthetic",
                      images=[f"images/{i % IMAGES}.png"], image_sizes=[[FRAME, FRAME]], task=task,
                      prompt=f"Question {i} about this chest X-ray?", answer=f"answer {i % 97}", split="train",
                      question_type="presence" if task == "vqa" else "",
                      boxes=[Box("opacity", [10.0, 20.0, 200.0, 240.0])] if task == "grounding" else [])

    for start in range(0, n, SHARD):
        write_shard((record(i) for i in range(start, min(n, start + SHARD))),
                    out / "records" / f"train-{start // SHARD:05d}.parquet")
    return out


def measure(data: Path, model: Path, batches: int, batch_size: int = 8) -> dict[str, Any]:
    """SFT's data path over ``data`` for ``batches`` batches; this process's peak RSS."""
    from deepmedix.model.processor import load_processor, processor_frame
    from deepmedix.train.sft import sample_dataset

    processor = load_processor(model)
    frame = processor_frame(processor.image_processor, "native")
    ids = select_ids(data, "train", list(TASKS))
    with tempfile.TemporaryDirectory() as tmp:  # what train_sft does with its train split
        ds, _ = sample_dataset(data, iter_records(data, "train", ids), plain_target, False, frame,
                               processor, 0, Path(tmp) / "samples.arrow", ids)
        n = len(ds)
        for _, batch in zip(range(batches), ds.iter(batch_size=batch_size)):
            texts = [processor.apply_chat_template(p + c, tokenize=False)
                     for p, c in zip(batch["prompt"], batch["completion"])]
            processor(text=texts, images=[im for ims in batch["images"] for im in ims], padding=True,
                      return_tensors="pt")
        del ds
    return {"records": n, "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def rss(small: int, large: int, batches: int = 8) -> dict[str, Any]:
    """Peak RSS of the data path over ``small`` and over ``large`` synthetic records, each in a fresh process."""
    from deepmedix.config import ModelConfig
    from deepmedix.model.tiny import build_tiny

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "model", ModelConfig(vocab_size=512),
                           [f"Question {i} about this chest X-ray? answer {i}" for i in range(200)])
        for key, n in (("small", small), ("large", large)):
            data = synthetic_dataset(Path(tmp) / key, n)
            r = subprocess.run([sys.executable, "-m", "deepmedix.train.rehearse_data", str(data), str(model),
                                str(batches)], capture_output=True, text=True, check=False)
            if r.returncode:
                raise RuntimeError(f"rehearse: the data path over {n} records failed:\n{r.stderr[-2000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            out[f"records_{key}"], out[f"rss_mb_{key}"] = got["records"], got["rss_mb"]
    out["rss_ratio"] = round(out["rss_mb_large"] / out["rss_mb_small"], 3)
    return out


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
