"""What the trainers share: records -> chat samples, the held-out generation check, saving a model folder, and the
loss-curve PNG."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from deepmedix import store
from deepmedix.data.schema import Record, load_records
from deepmedix.grounding import DEFAULT_FRAME, box_str, to_frame, user_message


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


def record_images(root: Path, rec: Record, frame: int | None = DEFAULT_FRAME) -> list[Image.Image]:
    """The record's images as the model sees them (RGB, resized to the frame square; ``frame=None`` leaves the
    size to :func:`deepmedix.model.load.generate`, which squares them itself)."""
    from deepmedix.model.load import open_image

    out = []
    for uri in rec.images:
        p = store.fetch_file(uri) if store.is_s3(uri) else (root / uri if not Path(uri).is_absolute() else Path(uri))
        try:
            with Image.open(p) as im:
                out.append(open_image(im, frame))
        except (OSError, ValueError) as exc:
            raise ValueError(f"record {rec.record_id}: image {uri} cannot be read ({exc})") from exc
    return out


def frame_boxes(rec: Record, frame: int) -> list[list[float]]:
    w, h = rec.image_sizes[0]
    return [to_frame(b.box, w, h, frame) for b in rec.boxes]


def plain_target(rec: Record, frame: int) -> str:
    """Stage 1 target: the reference answer; grounding answers carry their boxes in the model frame."""
    if rec.task == "grounding":
        return f"{rec.answer} " + ", ".join(box_str(b) for b in frame_boxes(rec, frame))
    return rec.answer


def sft_row(root: Path, rec: Record, target: str, reasoning: bool, frame: int = DEFAULT_FRAME) -> dict[str, Any]:
    images = record_images(root, rec, frame)
    return {
        "images": images,
        "prompt": [user_message(rec.prompt, len(images), reasoning=reasoning)],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": target}]}],
    }


def freeze_vision(model, tower: bool = True, merger: bool = True) -> int:
    """Keep the vision tower (patch embedding and blocks) and/or its merger fixed while the rest trains.
    Returns the number of parameters frozen."""
    visual = model.model.visual
    n = 0
    for name, p in visual.named_parameters():
        if (merger if name.startswith("merger.") else tower):
            p.requires_grad_(False)
            n += getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions parameters as they load
    return n


def save_model(trainer, processor, out_dir: Path) -> None:
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # a peft model: save merged weights, loadable by the stock class
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def write_curve(log_history: list[dict], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def batched(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def generate_on(loaded, root: Path, records: list[Record], max_new_tokens: int, batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None, frame: int = DEFAULT_FRAME) -> list[str]:
    """Greedy generation with the reasoning prompt for each record; returns raw outputs in order."""
    from deepmedix.model.load import generate

    outs: list[str] = []
    for chunk in batched(records, batch_size):
        outs.extend(generate(loaded, [record_images(root, r, None) for r in chunk], [r.prompt for r in chunk],
                             max_new_tokens=max_new_tokens, frame=frame))
        if progress:
            progress(len(outs), len(records))
    return outs


def image_dataset(rows: list[dict[str, Any]], column: str = "images"):
    """``datasets.Dataset.from_list(rows)``, with each row's PIL images (``rows[i][column]``) stored as PNG bytes
    written at zlib level 1. ``datasets`` would encode them itself at PNG's default level 6, about four times slower
    (about 0.1 s for a 512 x 512 RGB frame, most of a tiny run's set-up); PNG is lossless at any level, so the
    trainer decodes exactly the same pixels and the column has the same ``Image`` feature."""
    import io

    from datasets import Dataset
    from datasets import Image as ImageFeature

    def png(im: Image.Image) -> dict[str, Any]:
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)
        return {"bytes": buf.getvalue(), "path": None}

    ds = Dataset.from_list([{**row, column: [png(im) for im in row[column]]} for row in rows])
    return ds.cast_column(column, [ImageFeature()])
