"""The Qwen2.5-VL processor, image-only where torchvision is missing, and the files that make a model folder load
with the stock ``AutoProcessor`` (and vLLM) on a GPU machine.

``Qwen2_5_VLProcessor`` insists on a video processor, and video processors need torchvision, which does not run
beside the CPU torch build used here. :class:`ImageOnlyQwen2_5_VLProcessor` is the same processor with the video
part left out; when it saves a folder, :func:`write_stock_processor_files` rewrites the processor files so that the
stock class (with its video processor) loads the folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoTokenizer, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from deepmedix.errors import MissingInputError
from deepmedix.grounding import PAPER_PIXELS, Frame

# A Qwen2.5-VL chat template (system default, image/video placeholders, text parts), in the same shape as the
# template the released checkpoints carry.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_stock_processor_files(Path(save_directory))
        return out


def _image_processor_dict(folder: Path) -> dict:
    proc = folder / "processor_config.json"
    if proc.exists():
        data = json.loads(proc.read_text())
        if "image_processor" in data:
            return dict(data["image_processor"])
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        return json.loads(pre.read_text())
    raise MissingInputError(f"{folder}: no processor_config.json or preprocessor_config.json")


def write_stock_processor_files(folder: Path) -> None:
    """Make ``folder`` load with the stock ``Qwen2_5_VLProcessor``: name it as the processor class, add a video
    processor config, and write the flat ``preprocessor_config.json`` that older loaders (and vLLM) read."""
    image = _image_processor_dict(folder)
    image["image_processor_type"] = "Qwen2VLImageProcessor"
    image["processor_class"] = "Qwen2_5_VLProcessor"
    video = {k: image[k] for k in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                                    "image_std", "merge_size", "patch_size", "resample", "rescale_factor",
                                    "temporal_patch_size") if k in image}
    video.update({"video_processor_type": "Qwen2VLVideoProcessor", "size": dict(image.get("size", {})),
                  "min_frames": 4, "max_frames": 768, "do_sample_frames": False})
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": {k: v for k, v in image.items() if k != "processor_class"},
         "video_processor": video, "processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    flat = dict(image)
    size = image.get("size", {})
    if "shortest_edge" in size:  # the pre-5.x spelling of the pixel budget
        flat["min_pixels"], flat["max_pixels"] = size["shortest_edge"], size["longest_edge"]
    (folder / "preprocessor_config.json").write_text(json.dumps(flat, indent=2) + "\n")
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        data = json.loads(tok_cfg.read_text())
        data["processor_class"] = "Qwen2_5_VLProcessor"
        tok_cfg.write_text(json.dumps(data, indent=2) + "\n")


def has_torchvision() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def load_processor(folder: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The stock ``AutoProcessor`` where torchvision works, the image-only processor otherwise.

    ``min_pixels``/``max_pixels`` override the folder's pixel budget (the paper: both 262144, i.e. 512x512)."""
    folder = Path(folder)
    budget = {}
    if min_pixels or max_pixels:
        budget = {"size": {"shortest_edge": int(min_pixels or max_pixels),
                           "longest_edge": int(max_pixels or min_pixels)}}
    if has_torchvision():
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(folder))
        if budget:
            proc.image_processor.size = budget["size"]
        return proc
    image_cfg = _image_processor_dict(folder)
    for key in ("image_processor_type", "processor_class", "_processor_class", "auto_map"):
        image_cfg.pop(key, None)
    if "min_pixels" in image_cfg and "size" not in image_cfg:
        image_cfg["size"] = {"shortest_edge": image_cfg.pop("min_pixels"), "longest_edge": image_cfg.pop("max_pixels")}
    image_cfg.pop("min_pixels", None)
    image_cfg.pop("max_pixels", None)
    image_cfg.update(budget)
    image_processor = Qwen2VLImageProcessorPil(**image_cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    template = None
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text()
    elif (folder / "chat_template.json").exists():
        template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=template or getattr(tokenizer, "chat_template", None)
                                        or CHAT_TEMPLATE)


def _budget(size, fallback: dict) -> tuple[int, int]:
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    lo = get("shortest_edge") or get("min_pixels") or fallback.get("min_pixels") or PAPER_PIXELS
    hi = get("longest_edge") or get("max_pixels") or fallback.get("max_pixels") or PAPER_PIXELS
    return int(lo), int(hi)


def recorded_frame(folder: str | Path | None) -> str:
    """The frame a model folder was trained in, as its ``lineage.json`` records it (the training config's
    ``frame``; an old integer N is ``squareN``); ``native`` for a folder that records none (a released checkpoint,
    a freshly built model)."""
    lineage = Path(folder) / "lineage.json" if folder else None
    try:
        spec = json.loads(lineage.read_text()).get("config", {}).get("frame") if lineage else None
    except (OSError, ValueError, AttributeError):
        spec = None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = f"square{spec}"
    try:
        return Frame.parse(spec).spec if spec and spec != "auto" else "native"
    except ValueError:
        return "native"


def resolve_frame(spec, folder: str | Path | None) -> str:
    """``spec`` with ``auto`` replaced by the frame ``folder`` records; a bad spec is a ValueError."""
    if isinstance(spec, Frame):
        return spec.spec
    return recorded_frame(folder) if str(spec).strip().lower() == "auto" else Frame.parse(spec).spec


def processor_frame(image_processor, spec="native", folder: str | Path | None = None) -> Frame:
    """The :class:`~deepmedix.grounding.Frame` of ``spec`` for this image processor: its patch x merge factor and
    its pixel budget (``size.shortest_edge`` / ``longest_edge``, the 5.x spelling of min/max pixels). ``auto`` is
    the frame ``folder`` records (:func:`recorded_frame`)."""
    spec = spec if isinstance(spec, Frame) else resolve_frame(spec, folder)
    lo, hi = _budget(image_processor.size, vars(image_processor))
    return Frame.parse(spec, int(image_processor.patch_size) * int(image_processor.merge_size), lo, hi)


def folder_frame(folder: str | Path, spec="native", min_pixels: int = 0, max_pixels: int = 0) -> Frame:
    """The frame a model folder's processor gives ``spec``, read from its processor files without loading it
    (``min_pixels``/``max_pixels`` override the folder's budget as in :func:`load_processor`)."""
    cfg = _image_processor_dict(Path(folder))
    spec = spec if isinstance(spec, Frame) else resolve_frame(spec, folder)
    lo, hi = _budget(cfg.get("size") or {}, cfg)
    lo, hi = int(min_pixels or max_pixels or lo), int(max_pixels or min_pixels or hi)
    return Frame.parse(spec, int(cfg.get("patch_size", 14)) * int(cfg.get("merge_size", 2)), lo, hi)
