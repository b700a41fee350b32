"""Load a model folder (the tiny model, Qwen2.5-VL-7B-Instruct, the released DeepMedix-R1 — by path or ``s3://``)
and generate grounded answers from images and questions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from deepmedix import store
from deepmedix.errors import ModelLoadError
from deepmedix.grounding import DEFAULT_FRAME, user_message
from deepmedix.model.processor import load_processor


@dataclass
class Loaded:
    model: object
    processor: object
    path: Path

    @property
    def device(self):
        return next(self.model.parameters()).device


def check_model_folder(path: Path) -> None:
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


def open_image(path_or_image, frame: int | None = None) -> Image.Image:
    """An RGB image; with ``frame``, resized to the model's ``frame x frame`` square. Boxes in the output grammar
    live in that square, so every image the model sees — in training, evaluation and serving — goes through
    here, and :func:`deepmedix.grounding.from_frame` maps its boxes back to the original pixels per axis."""
    if isinstance(path_or_image, Image.Image):
        img = path_or_image
    else:
        img = Image.open(path_or_image)
        img.load()
    img = img.convert("RGB")
    if frame and img.size != (frame, frame):
        img = img.resize((frame, frame), Image.Resampling.BICUBIC)
    return img


def chat_prompts(processor, questions: list[str], n_images: list[int]) -> list[str]:
    return [processor.apply_chat_template([user_message(q, n)], add_generation_prompt=True, tokenize=False)
            for q, n in zip(questions, n_images)]


@dataclass
class Generation:
    """One output of :func:`generate_batch`: the decoded text and its token counts."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (token budget spent)


def eos_token_ids(loaded: Loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


@torch.no_grad()
def generate_batch(loaded: Loaded, images: list[list[Image.Image]], questions: list[str],
                   max_new_tokens: int | list[int] = 256, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, frame: int = DEFAULT_FRAME, streamer=None) -> list[Generation]:
    """One batched ``generate`` over several queries (each one or more images and a task text; the instruction
    is added). ``max_new_tokens`` may be one budget per query: the batch runs to the largest and each output is
    cut to its own budget, which gives the same tokens as a run with that budget alone (a prefix of the longer
    run, greedy or sampled). ``streamer`` gets ``generate``'s ``put(token_ids)`` calls for the whole batch."""
    budgets = [int(max_new_tokens)] * len(questions) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    proc = loaded.processor
    texts = chat_prompts(proc, questions, [len(i) for i in images])
    flat = [open_image(im, frame) for ims in images for im in ims]
    inputs = proc(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(loaded.device)
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    out = loaded.model.generate(**inputs, max_new_tokens=max(budgets), streamer=streamer, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:].cpu()
    eos_ids = eos_token_ids(loaded)
    prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, budget, n_prompt in zip(new.tolist(), budgets, prompt_lens):
        row = row[:budget]
        end = next((k for k, t in enumerate(row) if t in eos_ids), None)
        n = len(row) if end is None else end + 1
        text = proc.decode(row[:n], skip_special_tokens=True).strip()
        results.append(Generation(text, int(n_prompt), n, "length" if end is None else "stop"))
    return results


def generate(loaded: Loaded, images: list[list[Image.Image]], questions: list[str], max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, frame: int = DEFAULT_FRAME) -> list[str]:
    """One batched ``generate``: each query is one or more images and a task text (the instruction is added)."""
    return [g.text for g in generate_batch(loaded, images, questions, max_new_tokens, do_sample=do_sample,
                                           temperature=temperature, frame=frame)]
