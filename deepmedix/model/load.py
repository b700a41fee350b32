"""Load a model folder (the tiny model, Qwen2.5-VL-7B-Instruct, the released DeepMedix-R1 — by path or ``s3://``);
:mod:`deepmedix.model.generate` generates with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deepmedix import store
from deepmedix.errors import InputError, ModelLoadError
from deepmedix.model.processor import load_processor, processor_frame


@dataclass
class Loaded:
    model: object
    processor: object
    path: Path

    @property
    def device(self):
        return next(self.model.parameters()).device

    def frame(self, spec="auto"):
        """The box frame ``spec`` (``native`` | ``squareN`` | ``auto``: the one this folder was trained in, else
        native) means for this model's processor."""
        return processor_frame(self.processor.image_processor, spec, self.path)


def check_model_folder(path: Path) -> None:
    try:
        store.check_readable(path)  # an unreadable folder would otherwise look empty ("no config.json")
    except InputError as exc:
        raise ModelLoadError(str(exc)) from exc
    cfg = path / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"{path}: no config.json — not a model folder")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg}: not valid JSON ({exc})") from exc
    if data.get("model_type") != "qwen2_5_vl":
        raise ModelLoadError(f"{cfg}: model_type is {data.get('model_type')!r}, expected 'qwen2_5_vl'")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path}: no weights (*.safetensors)")


def load(uri: str | Path, device: str | None = None, dtype: str | None = None, min_pixels: int = 0,
         max_pixels: int = 0) -> Loaded:
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = store.fetch(uri)
    check_model_folder(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.to(device).eval()
    processor = load_processor(path, min_pixels or None, max_pixels or None)
    return Loaded(model=model, processor=processor, path=path)
