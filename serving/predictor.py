"""The KServe predictor: v1 ``{"instances": [{"image", "question"}]}`` in, grounded answers out.

Every instance is decoded and checked before any generation (a bad one fails the whole request with
``kserve.errors.InvalidInput`` -> HTTP 400 naming ``instances[i].field``); then all instances go through ONE batched
:func:`deepmedix.model.load.generate`. Boxes in the output are converted from the model's ``frame x frame`` square
back to the original image's pixels with :func:`deepmedix.grounding.from_frame`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
from pathlib import Path

import kserve
import numpy as np
from kserve.errors import InvalidInput
from PIL import Image, ImageDraw, ImageFont

from deepmedix import grounding
from deepmedix.model import load as model_load

FORMATS = ("PNG", "JPEG")
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
COLORS = [(255, 0, 0), (0, 200, 0), (0, 128, 255), (255, 160, 0), (200, 0, 255), (0, 220, 220)]


def build_prediction(raw: str, width: int, height: int, frame: int = grounding.DEFAULT_FRAME) -> dict:
    """One prediction from one raw model output; boxes go from the model frame to original pixels."""
    parsed = grounding.parse(raw)
    steps = [{"text": s.text, "boxes": [grounding.from_frame(b, width, height, frame) for b in s.boxes]}
             for s in parsed.steps]
    return {
        "text": raw,
        "answer": parsed.answer,
        "format_ok": parsed.format_ok,
        "steps": steps,
        "boxes": [b for s in steps for b in s["boxes"]],
        "image_size": [width, height],
    }


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for the processor; 16-bit / float greyscale (common for X-rays) is min-max scaled to 8 bits first."""
    if img.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(data, where: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """A base64 PNG/JPEG string (optionally a ``data:image/...;base64,`` URL) -> RGB image, or InvalidInput."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidInput(f"{where}.image: missing or empty (expected a base64-encoded PNG or JPEG string)")
    data = data.strip()
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise InvalidInput(f"{where}.image: data URL is not base64-encoded")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise InvalidInput(f"{where}.image: larger than the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where}.image: not valid base64 ({exc})") from None
    if not raw:
        raise InvalidInput(f"{where}.image: decodes to zero bytes")
    if len(raw) > max_bytes:
        raise InvalidInput(f"{where}.image: {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)  # lazy: reads the header only
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise InvalidInput(f"{where}.image: {w}x{h} pixels, over the limit of {max_pixels} pixels")
        img.load()
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{where}.image: too many pixels ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, truncated data, bad chunks, ...
        raise InvalidInput(f"{where}.image: not a decodable PNG or JPEG image ({type(exc).__name__})") from None
    return to_rgb(img)


class DeepMedixModel(kserve.Model):
    def __init__(self, name: str, model_uri: str, max_new_tokens: int = 256, frame: int = grounding.DEFAULT_FRAME,
                 max_image_bytes: int = 20_000_000, max_pixels: int = 40_000_000, max_instances: int = 32,
                 max_new_tokens_limit: int = 2048):
        super().__init__(name)
        self.model_uri = str(model_uri)
        self.max_new_tokens = int(max_new_tokens)
        self.frame = int(frame)
        self.max_image_bytes = int(max_image_bytes)
        self.max_pixels = int(max_pixels)
        self.max_instances = int(max_instances)
        self.max_new_tokens_limit = max(int(max_new_tokens_limit), self.max_new_tokens)
        self.loaded: model_load.Loaded | None = None
        self._lock = threading.Lock()  # one generate at a time on the shared model

    def load(self) -> bool:
        self.loaded = model_load.load(self.model_uri)
        self.ready = True
        return self.ready

    # ------------------------------------------------------------ request checks

    def decode_instances(self, payload) -> tuple[list[Image.Image], list[str], list[int]]:
        if not isinstance(payload, dict):
            raise InvalidInput("request body: expected a JSON object {\"instances\": [...]} (v1 protocol)")
        instances = payload.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("instances: must be a non-empty list of {\"image\": base64, \"question\": str}")
        if len(instances) > self.max_instances:
            raise InvalidInput(f"instances: {len(instances)} instances, over the limit of {self.max_instances}")
        images, questions, budgets = [], [], []
        for i, inst in enumerate(instances):
            where = f"instances[{i}]"
            if not isinstance(inst, dict):
                raise InvalidInput(f"{where}: expected an object with \"image\" and \"question\"")
            q = inst.get("question")
            if not isinstance(q, str) or not q.strip():
                raise InvalidInput(f"{where}.question: missing or empty (expected a non-empty string)")
            n = inst.get("max_new_tokens", self.max_new_tokens)
            if n is None:
                n = self.max_new_tokens
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_new_tokens_limit:
                raise InvalidInput(f"{where}.max_new_tokens: expected an integer in 1..{self.max_new_tokens_limit}")
            images.append(decode_image(inst.get("image"), where, self.max_image_bytes, self.max_pixels))
            questions.append(q.strip())
            budgets.append(n)
        return images, questions, budgets

    # ------------------------------------------------------------ inference

    def _truncate(self, text: str, n_tokens: int) -> str:
        """Cut a batch output to an instance's own (smaller) token budget; greedy decoding makes this the same
        prefix the instance would have produced alone, up to tokenizer round-trip."""
        tok = getattr(self.loaded.processor, "tokenizer", None)
        if tok is None:
            return text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens], skip_special_tokens=True).strip()

    def run(self, payload) -> dict:
        """Synchronous predict: validate everything, then one batched generate."""
        if self.loaded is None:
            raise RuntimeError(f"model {self.name} is not loaded")
        images, questions, budgets = self.decode_instances(payload)
        batch_budget = max(budgets)
        with self._lock:
            raws = model_load.generate(self.loaded, [[im] for im in images], questions, max_new_tokens=batch_budget,
                                      frame=self.frame)
        preds = []
        for raw, im, n in zip(raws, images, budgets):
            if n < batch_budget:
                raw = self._truncate(raw, n)
            preds.append(build_prediction(raw, im.width, im.height, self.frame))
        return {"predictions": preds}

    async def predict(self, payload, headers=None, response_headers=None) -> dict:
        # Off the event loop, so health checks and other requests stay answered during generation.
        return await asyncio.to_thread(self.run, payload)


def draw_overlay(image: Image.Image, boxes: list[list[float]], labels: list[str] | None, path) -> Path:
    """Write ``image`` as an RGB PNG at ``path`` with ``boxes`` (original pixels) drawn as coloured rectangles."""
    img = model_load.open_image(image).copy()
    draw = ImageDraw.Draw(img)
    width = max(2, round(min(img.size) / 150))
    font = ImageFont.load_default()
    for k, box in enumerate(boxes):
        color = COLORS[k % len(COLORS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        label = labels[k] if labels and k < len(labels) else None
        if label:
            tx, ty = x1 + width, (y1 - 12 if y1 >= 12 else y1 + width)
            l, t, r, b = draw.textbbox((tx, ty), label, font=font)
            draw.rectangle([l - 1, t - 1, r + 1, b + 1], fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=color, font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out
