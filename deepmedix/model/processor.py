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
