"""Request checking for every protocol: limits, image decoding (PNG, JPEG, DICOM) and the parsed query.

Everything here runs before a request is queued, so a bad request costs no generation and fails with
``kserve.errors.InvalidInput`` (HTTP 400) naming the field: ``instances[1].image``, ``inputs[0].data[2]``,
``messages[0].content[1].image_url.url``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from kserve.errors import InvalidInput
from PIL import Image, ImageOps

from deepmedix.grounding import DEFAULT_FRAME, INSTRUCTION, Frame

PIL_FORMATS = ("PNG", "JPEG")
VIEW_NAME_RE = re.compile(r"Picture\s*\d+\s*:", re.I)
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass
class Limits:
    """What one server accepts. Defaults suit a 7B model on one GPU; tests and the CLI pass their own."""
    max_image_bytes: int = 20_000_000
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked from the header before decoding
    max_new_tokens: int = 512  # default budget when a request names none
    max_new_tokens_limit: int = 2048  # the most a request may ask for
    max_instances: int = 16  # queries in one v1/v2 request
    max_views: int = 4  # images in one query (the views of a study: PA, lateral, ...)
    max_text_chars: int = 20_000
    frame: Frame = DEFAULT_FRAME  # the model's box frame; images are resized by it when a request is parsed


OVERLAY_MAX_SIDE = 2048  # overlays are drawn on the image scaled to at most this long side


@dataclass
class Query:
    """One question about one or more images (the views of one study), checked and decoded; what the batcher
    turns into one generate row. Only the model's view of each image is kept (sized by the frame: the pixel budget,
    under 1 MB each) plus the original sizes; the original pixels are kept (scaled to at most
    ``OVERLAY_MAX_SIDE``) only when an overlay is asked for."""
    images: list[Image.Image]  # RGB, the model's input (Frame.input_size), in the request's order
    sizes: list[tuple[int, int]]  # each original image's (width, height): its grounding boxes are mapped back to it
    question: str
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    originals: list[Image.Image] | None = None  # for the overlay PNG
    system: str | None = None  # a system prompt (OpenAI system messages); None: the chat template's default

    @property
    def overlay(self) -> bool:
        return self.originals is not None

    @property
    def sampling(self) -> tuple:
        """Queries batch together only when they decode the same way."""
        return (False, 1.0, 1.0) if self.temperature == 0 else (True, self.temperature, self.top_p)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for the processor; 16-bit / float greyscale (common for X-rays) is min-max scaled to 8 bits first."""
    if img.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def image_bytes(data, where: str, max_bytes: int) -> bytes:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) or raw bytes -> the file's bytes."""
    if isinstance(data, (bytes, bytearray)):
        raw = bytes(data)
    else:
        if data is None or (isinstance(data, str) and not data.strip()):
            raise InvalidInput(f"{where}: missing or empty (expected a base64-encoded PNG, JPEG or DICOM file)")
        if not isinstance(data, str):
            raise InvalidInput(f"{where}: expected a base64 string, got {type(data).__name__}")
        data = data.strip()
        if data.startswith("data:"):
            head, _, data = data.partition(",")
            if ";base64" not in head:
                raise InvalidInput(f"{where}: data URL is not base64-encoded")
        elif data.startswith(("http://", "https://", "s3://", "file:")):
            raise InvalidInput(f"{where}: only base64 data or data: URLs are accepted (the server fetches no URL)")
        if len(data) * 3 // 4 > max_bytes * 1.05 + 3:  # line breaks (MIME base64) are allowed and dropped
            raise InvalidInput(f"{where}: larger than the limit of {max_bytes} bytes")
        data = "".join(data.split())
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"{where}: not valid base64 ({exc})") from None
    if not raw:
        raise InvalidInput(f"{where}: decodes to zero bytes")
    if len(raw) > max_bytes:
        raise InvalidInput(f"{where}: {len(raw)} bytes, over the limit of {max_bytes} bytes")
    return raw


def decode_image_bytes(raw: bytes, where: str, max_pixels: int) -> Image.Image:
    """PNG, JPEG or DICOM bytes -> RGB image at its original size, or InvalidInput. The pixel count is checked
    from the header, before any pixel is decoded."""
    if raw[128:132] == b"DICM":
        from deepmedix.data.dicom import decode_dicom
        from deepmedix.data.sources.base import BadInput

        try:
            arr = decode_dicom(raw, where, max_pixels=max_pixels)
        except BadInput as exc:
            raise InvalidInput(f"{where}: {exc.reason}") from None
        except Exception as exc:  # pydicom raises many types on garbage
            raise InvalidInput(f"{where}: not a decodable DICOM file ({type(exc).__name__})") from None
        return Image.fromarray(arr, "L").convert("RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=PIL_FORMATS)  # lazy: reads the header only
            w, h = img.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise InvalidInput(f"{where}: {w}x{h} pixels, over the limit of {max_pixels} pixels")
            img.load()
            img = ImageOps.exif_transpose(img)  # boxes are given in the image as it is displayed
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{where}: over the limit of {max_pixels} pixels ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, truncated data, bad chunks, ...
        raise InvalidInput(f"{where}: not a decodable PNG, JPEG or DICOM image ({type(exc).__name__})") from None
    return to_rgb(img)


def decode_image(data, where: str, limits: Limits) -> Image.Image:
    img = decode_image_bytes(image_bytes(data, where, limits.max_image_bytes), where, limits.max_pixels)
    try:  # the processor's grid for it (Qwen2-VL's smart_resize refuses an aspect ratio of 200 or more)
        limits.frame.size(*img.size)
    except ValueError as exc:
        raise InvalidInput(f"{where}: {img.width}x{img.height} pixels: {exc}") from None
    return img


def make_query(imgs: list[Image.Image], question: str, limits: Limits, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, overlay: bool = False) -> Query:
    """The model's view of each image (:func:`deepmedix.data.records.open_image`, sized by the frame: each view
    its own size) and the original sizes."""
    from deepmedix.data.records import open_image

    originals = None
    if overlay:
        originals = []
        for img in imgs:
            originals.append(img.copy())
            originals[-1].thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    return Query([open_image(img, limits.frame) for img in imgs], [img.size for img in imgs], question,
                 max_new_tokens, temperature, top_p, originals)


def view_count(n: int, where: str, limits: Limits) -> None:
    if n > limits.max_views:
        raise InvalidInput(f"{where}: {n} images, over the limit of {limits.max_views} views per query")


def question_text(value, where: str, limits: Limits) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{where}: missing or empty (expected a non-empty string)")
    if len(value) > limits.max_text_chars:
        raise InvalidInput(f"{where}: {len(value)} characters, over the limit of {limits.max_text_chars}")
    # The grounded-reasoning instruction is added by the prompt builder; a client that sends it already (as the
    # released evaluation scripts do) must not get it twice.
    return value.replace(INSTRUCTION, "").strip() or value.strip()


def int_in(value, where: str, lo: int, hi: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise InvalidInput(f"{where}: expected an integer in {lo}..{hi}")
    return int(value)


def float_in(value, where: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    if value is None:
        return default
    bad = InvalidInput(f"{where}: expected a number in {'(' if lo_open else '['}{lo}, {hi}]")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise bad
    try:
        v = float(value)
    except OverflowError:
        raise bad from None
    if not math.isfinite(v) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise bad
    return v


def bool_of(value, where: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: expected true or false")
    return value


def sampling_of(obj: dict, where: str, limits: Limits) -> dict:
    """``max_new_tokens``/``temperature``/``top_p``/``overlay`` from one object (a v1 instance, v2 parameters)."""
    return {
        "max_new_tokens": int_in(obj.get("max_new_tokens"), f"{where}max_new_tokens", 1,
                                 limits.max_new_tokens_limit, limits.max_new_tokens),
        "temperature": float_in(obj.get("temperature"), f"{where}temperature", 0.0, 2.0, 0.0),
        "top_p": float_in(obj.get("top_p"), f"{where}top_p", 0.0, 1.0, 1.0, lo_open=True),
        "overlay": bool_of(obj.get("overlay"), f"{where}overlay"),
    }


# ------------------------------------------------------------------------------------------------ v1

def v1_images(inst: dict, where: str, limits: Limits) -> list[tuple[str, object]]:
    """An instance's images with the field each came from: ``image`` (one base64 string, or a list of them: the
    views of one study) or ``images`` (a list)."""
    if "image" in inst and "images" in inst:
        raise InvalidInput(f"{where}: give \"image\" or \"images\", not both")
    key = "images" if "images" in inst else "image"
    value = inst.get(key)
    if isinstance(value, list):
        if not value:
            raise InvalidInput(f"{where}.{key}: an empty list (expected one or more base64 images)")
        view_count(len(value), f"{where}.{key}", limits)
        return [(f"{where}.{key}[{k}]", v) for k, v in enumerate(value)]
    if key == "images":
        raise InvalidInput(f"{where}.images: expected a list of base64 images")
    return [(f"{where}.image", value)]


def parse_v1(payload, limits: Limits) -> list[Query]:
    """``{"instances": [{"image": b64 | [b64, ...], "question": str, "max_new_tokens"?, "temperature"?, "top_p"?,
    "overlay"?}]}`` (``images`` is the same as a list ``image``: the views of one study, in order). Every instance
    is checked before any is decoded into the queue."""
    if not isinstance(payload, dict):
        raise InvalidInput("request body: expected a JSON object {\"instances\": [...]} (v1 protocol)")
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("instances: must be a non-empty list of {\"image\": base64, \"question\": str}")
    if len(instances) > limits.max_instances:
        raise InvalidInput(f"instances: {len(instances)} instances, over the limit of {limits.max_instances}")
    checked = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(inst, dict):
            raise InvalidInput(f"{where}: expected an object with \"image\" and \"question\"")
        q = question_text(inst.get("question"), f"{where}.question", limits)
        opts = sampling_of(inst, f"{where}.", limits)
        images = v1_images(inst, where, limits)
        checked.append((images, q, opts))
    return [make_query([decode_image(v, w, limits) for w, v in images], q, limits, **opts)
            for images, q, opts in checked]


# ------------------------------------------------------------------------------------------------ v2

def _tensor_values(inp, where: str, n: int | None) -> list:
    data = inp.data
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).tolist()
    if not isinstance(data, list):
        data = [data]
    flat = []
    stack = list(reversed(data))
    while stack:  # nested lists from a shape like [n, 1]
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            flat.append(v)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in inp.shape or []):
        raise InvalidInput(f"{where}: shape {list(inp.shape)} must be non-negative integers")
    count = math.prod(inp.shape) if inp.shape else len(flat)
    if count != len(flat):
        raise InvalidInput(f"{where}: shape {list(inp.shape)} holds {count} values but {len(flat)} were sent")
    if n is not None and len(flat) not in (1, n):
        raise InvalidInput(f"{where}: {len(flat)} values, expected {n} (one per query) or 1 (for all)")
    return flat


def parse_v2(request, limits: Limits) -> list[Query]:
    """Open Inference Protocol: BYTES tensors ``image`` (base64 strings in the JSON body; the REST binary extension is
    refused by the server) and ``text``, one element per query; optional ``max_new_tokens`` (INT32/INT64) tensor;
    ``parameters`` may carry ``max_new_tokens``, ``temperature``, ``top_p``, ``overlay`` for the whole request.
    ``image`` of shape ``[n]`` is one image per query; ``[n, k]`` is ``k`` images per query (the views of one study,
    row-major: query ``j``'s views are elements ``j*k .. j*k+k-1``)."""
    by_name = {}
    for k, inp in enumerate(request.inputs):
        if inp.name in by_name:
            raise InvalidInput(f"inputs[{k}]: a second input named {inp.name!r}")
        by_name[inp.name] = (k, inp)
    unknown = sorted(set(by_name) - {"image", "text", "max_new_tokens"})
    if unknown:
        raise InvalidInput(f"inputs: unknown input(s) {unknown}; expected 'image', 'text' and optionally "
                           "'max_new_tokens'")
    for name in ("image", "text"):
        if name not in by_name:
            raise InvalidInput(f"inputs: no input named {name!r} (a BYTES tensor, one element per query)")
        k, inp = by_name[name]
        if inp.datatype != "BYTES":
            raise InvalidInput(f"inputs[{k}] ({name}): datatype {inp.datatype}, expected BYTES")
    ki, images_in = by_name["image"]
    images = _tensor_values(images_in, f"inputs[{ki}] (image)", None)
    shape = list(images_in.shape or [len(images)])
    if len(shape) > 2:
        raise InvalidInput(f"inputs[{ki}] (image): shape {shape}; expected [queries] or [queries, views]")
    k = shape[1] if len(shape) == 2 else 1
    n = len(images) // k if k else 0
    if not n:
        raise InvalidInput(f"inputs[{ki}] (image): no elements")
    if n > limits.max_instances:
        raise InvalidInput(f"inputs[{ki}] (image): {n} queries, over the limit of {limits.max_instances}")
    view_count(k, f"inputs[{ki}] (image) shape {shape}", limits)
    kt, texts_in = by_name["text"]
    texts = _tensor_values(texts_in, f"inputs[{kt}] (text)", n)
    texts = texts * n if len(texts) == 1 else texts
    params = request.parameters or {}
    if not isinstance(params, dict):
        params = dict(params)
    params = {k: (v.value if hasattr(v, "value") else v) for k, v in params.items()}
    opts = sampling_of(params, "parameters.", limits)
    budgets = [opts["max_new_tokens"]] * n
    if "max_new_tokens" in by_name:
        km, tok_in = by_name["max_new_tokens"]
        if tok_in.datatype not in ("INT32", "INT64", "UINT32", "UINT64", "INT16", "UINT16"):
            raise InvalidInput(f"inputs[{km}] (max_new_tokens): datatype {tok_in.datatype}, expected INT32/INT64")
        vals = _tensor_values(tok_in, f"inputs[{km}] (max_new_tokens)", n)
        vals = vals * n if len(vals) == 1 else vals
        budgets = [int_in(v, f"inputs[{km}] (max_new_tokens).data[{j}]", 1, limits.max_new_tokens_limit, 0)
                   for j, v in enumerate(vals)]
    questions = []
    for j in range(n):
        text = texts[j].decode("utf-8", "replace") if isinstance(texts[j], (bytes, bytearray)) else texts[j]
        questions.append(question_text(text, f"inputs[{kt}] (text).data[{j}]", limits))
    return [make_query([decode_image(images[e], f"inputs[{ki}] (image).data[{e}]", limits)
                        for e in range(j * k, j * k + k)],
                       questions[j], limits, budgets[j], opts["temperature"], opts["top_p"], opts["overlay"])
            for j in range(n)]


# ------------------------------------------------------------------------------------------------ OpenAI

CHAT_UNSUPPORTED = {  # refused when set (truthy), rather than silently ignored
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "stop": "stop sequences are not supported (the answer ends at \\boxed{...})",
    "logit_bias": "logit bias is not supported",
    "presence_penalty": "presence penalty is not supported",
    "frequency_penalty": "frequency penalty is not supported",
}


def _text_parts(content, where: str, allow_images: bool) -> tuple[list[str], list[tuple[str, object]]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list) or not content:
        raise InvalidInput(f"{where}: expected a string or a non-empty list of content parts")
    texts, images = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise InvalidInput(f"{pw}: expected an object with a \"type\"")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidInput(f"{pw}.text: expected a string")
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise InvalidInput(f"{pw}.image_url.url: expected a data: URL string")
            if not url.startswith("data:"):
                raise InvalidInput(f"{pw}.image_url.url: only data: URLs (base64 PNG, JPEG or DICOM) are accepted;"
                                   " the server fetches no URL")
            images.append((f"{pw}.image_url.url", url))
        elif kind == "image_url":
            raise InvalidInput(f"{pw}: images go in the user message")
        else:
            raise InvalidInput(f"{pw}.type: {kind!r} is not supported (expected 'text' or 'image_url')")
    return texts, images


class UnknownModel(InvalidInput):
    """The request names another model: HTTP 404 (OpenAI's ``model_not_found``)."""


def parse_chat(body, limits: Limits, served: str | None = None) -> tuple[Query, dict]:
    """An OpenAI chat completion request -> one Query plus the options the response needs (``model``,
    ``stream``, ``include_usage``). One user turn (after optional system turns, which become the system prompt)
    with one or more ``image_url`` parts (the views of one study, in the order given). ``served``: the model name
    this server answers to (else :class:`UnknownModel`), checked before any image is decoded."""
    if not isinstance(body, dict):
        raise InvalidInput("request body: expected a JSON object (OpenAI chat completion request)")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("model: expected the served model's name (GET /openai/v1/models lists it)")
    if served is not None and model != served:
        raise UnknownModel(f"model: the model {model!r} does not exist (this server serves {served!r})")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages: expected a non-empty list of {\"role\", \"content\"}")
    for key, why in CHAT_UNSUPPORTED.items():
        if body.get(key):
            raise InvalidInput(f"{key}: {why} by this server")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise InvalidInput("n: only n=1 is supported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise InvalidInput("response_format: only {\"type\": \"text\"} is supported")
    users, systems = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidInput(f"{where}: expected an object with \"role\" and \"content\"")
        role = m.get("role")
        if role in ("system", "developer"):
            systems += _text_parts(m.get("content"), f"{where}.content", allow_images=False)[0]
        elif role == "user":
            users.append(i)
        elif role == "assistant":
            raise InvalidInput(f"{where}.role: multi-turn conversations are not supported; send one user message "
                               "(with the image) after optional system messages")
        else:
            raise InvalidInput(f"{where}.role: {role!r} is not one of 'system', 'developer', 'user'")
    if len(users) != 1:
        raise InvalidInput(f"messages: {len(users)} user messages; expected exactly one (with the image)")
    where = f"messages[{users[0]}].content"
    texts, images = _text_parts(messages[users[0]].get("content"), where, allow_images=True)
    if not images:
        raise InvalidInput(f"{where}: no image_url part; expected a chest X-ray image (or several views of one "
                           "study)")
    view_count(len(images), f"{where} (image_url parts)", limits)
    # ``Picture N:`` parts name the views as the prompt builder does (grounding.user_content; a client sending
    # Qwen2.5-VL's add_vision_id names, or the grounding transformer in front of this server): not the question
    texts = [t for t in texts if t.strip() and not VIEW_NAME_RE.fullmatch(t.strip())]
    question = question_text("\n".join(texts), f"{where} (text parts)", limits)
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    budget = int_in(budget, name, 1, limits.max_new_tokens_limit, limits.max_new_tokens)
    temperature = float_in(body.get("temperature"), "temperature", 0.0, 2.0, 0.0)
    top_p = float_in(body.get("top_p"), "top_p", 0.0, 1.0, 1.0, lo_open=True)
    if body.get("seed") is not None and temperature > 0:
        raise InvalidInput("seed: seeded sampling is not supported (batched requests share one random stream); "
                           "use temperature 0 for reproducible answers")
    overlay = bool_of(body.get("overlay"), "overlay")
    stream = bool_of(body.get("stream"), "stream")
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    system = "\n".join(t for t in systems if t.strip()) or None
    if system is not None and len(system) > limits.max_text_chars:
        raise InvalidInput(f"messages (system): {len(system)} characters, over the limit of {limits.max_text_chars}")
    query = make_query([decode_image(url, w, limits) for w, url in images], question, limits, budget, temperature,
                       top_p, overlay)
    query.system = system
    return query, {"model": model, "stream": stream, "include_usage": include_usage}
