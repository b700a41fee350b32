"""What the trainers share: a record -> a chat sample, the trainer's image dataset, freezing the vision tower,
saving a model folder, the loss-curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from deepmedix.data.records import record_images
from deepmedix.data.schema import Record
from deepmedix.grounding import DEFAULT_FRAME, user_message


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
