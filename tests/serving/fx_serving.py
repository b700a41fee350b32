"""Fixtures for the serving tests: a tiny Qwen2.5-VL taught one grounded answer, and test images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

# What the taught model says for any chest X-ray and question: one step with one box (in the 512 x 512 frame).
TAUGHT = r"<think> the heart with [128, 256, 384, 448] is enlarged </think> The answer is: \boxed{cardiomegaly}"
TAUGHT_BOX_FRAME = [128, 256, 384, 448]
QUESTIONS = ("Is the heart enlarged?", "Findings?", "Which abnormality is seen?", "Describe the image.")


def image(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.float32)
    arr = (arr * rng.uniform(0.3, 1.0) + rng.normal(0, 20, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def png_bytes(width: int = 300, height: int = 200, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(width: int = 300, height: int = 200, seed: int = 0) -> str:
    return base64.b64encode(png_bytes(width, height, seed)).decode()


def taught_model(out: Path, steps: int = 120) -> Path:
    """The tiny model, trained (full fine-tuning, plain torch loop) until greedy decoding gives ``TAUGHT`` for
    any image and question: a real model whose output the server must ground. ~20 s on 2 cores."""
    import torch

    from deepmedix.model.load import chat_prompts, load, open_image
    from deepmedix.model.tiny import build_tiny

    build_tiny(out, texts=[TAUGHT] * 20)
    loaded = load(out, device="cpu")
    proc, model = loaded.processor, loaded.model
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        k = step % len(QUESTIONS)
        img = open_image(image(64 + 40 * k, 48 + 30 * k, seed=step), 512)
        question = QUESTIONS[k] if step % 2 else f"{QUESTIONS[k]} {step} {QUESTIONS[(k + step) % len(QUESTIONS)]}"
        prompt = chat_prompts(proc, [question], [1])[0]
        full = proc(text=[prompt + TAUGHT + "<|im_end|>"], images=[img], return_tensors="pt")
        n_prompt = proc(text=[prompt], images=[img], return_tensors="pt")["input_ids"].shape[1]
        labels = full["input_ids"].clone()
        labels[:, :n_prompt] = -100
        loss = model(**full, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    return out


def make_dicom(pixels):
    """A DICOM Part 10 file's bytes (the curation tests' writer, tests/data/fx_dicom.py)."""
    import sys

    data_tests = str(Path(__file__).resolve().parents[1] / "data")
    if data_tests not in sys.path:
        sys.path.insert(0, data_tests)
    from fx_dicom import make_dicom as make

    return make(pixels)
