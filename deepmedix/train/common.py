"""What the trainers share: a record -> a chat sample, the trainers' lazy image datasets, freezing the vision
tower, saving a model folder, the loss-curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from deepmedix.data.records import image_file, load_image
from deepmedix.data.schema import Record
from deepmedix.grounding import Frame, user_message


def sft_row(root: Path, rec: Record, target: str, reasoning: bool) -> dict[str, Any]:
    """One prompt-completion sample. Its images are named, not decoded (``image_files``, with their stored
    ``image_sizes``): the trainer's dataset decodes them when a batch is taken (:func:`lazy_image_dataset`)."""
    files = [image_file(root, uri) for uri in rec.images]
    return {
        "image_files": files,
        "image_sizes": [list(s) for s in rec.image_sizes],
        "record_id": rec.record_id,
        "prompt": [user_message(rec.prompt, len(files), reasoning=reasoning)],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": target}]}],
    }


class LoadImages:
    """A lazy dataset's transform: each row's ``image_files`` become its ``images`` (RGB, sized by ``frame``:
    :func:`deepmedix.data.records.load_image`), decoded when a batch is taken — in the DataLoader's worker
    processes when there are some. Picklable, so the workers get it."""

    def __init__(self, frame: Frame):
        self.frame = frame

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = {k: v for k, v in batch.items() if k not in ("image_files", "image_sizes", "record_id")}
        out["images"] = [[load_image(f, self.frame, rid, Path(f).name) for f in files]
                         for files, rid in zip(batch["image_files"], batch["record_id"])]
        return out


def lazy_image_dataset(rows: Iterable[dict[str, Any]], frame: Frame, path: Path | None = None,
                       order: list[str] | None = None):
    """A ``datasets.Dataset`` of the rows' text and image file names only, whose ``images`` are decoded per batch
    on access (``Dataset.with_transform``; TRL's SFTTrainer takes such a dataset for a VLM, where it skips its own
    preparation: trl/trainer/sft_trainer.py). With ``path``, the rows are written there as they come (an Arrow
    file, memory-mapped when read), so memory does not grow with their number either, and then put in ``order``
    (record ids; the rows may come in another). What a stage decodes at a time is one batch."""
    from datasets import Dataset

    if path is None:
        return Dataset.from_list(list(rows)).with_transform(LoadImages(frame))
    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer, n = ArrowWriter(path=str(path)), 0
    try:
        for row in rows:
            writer.write(row)
            n += 1
        if n:
            writer.finalize()
    finally:
        writer.close()
    if not n:
        return Dataset.from_list([]).with_transform(LoadImages(frame))
    ds = Dataset.from_file(str(path))
    if order is not None:
        at = {rid: i for i, rid in enumerate(ds["record_id"])}
        ds = ds.select([at[rid] for rid in order if rid in at])
    return ds.with_transform(LoadImages(frame))


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
