from __future__ import annotations

import json

import pytest
from PIL import Image

from deepmedix.model.load import ModelLoadError, generate, load
from deepmedix.model.processor import ImageOnlyQwen2_5_VLProcessor
from deepmedix.model.tiny import SPECIAL_TOKENS, build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "m", texts=["the heart is enlarged"])


def test_folder_is_a_stock_qwen2_5_vl_folder(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    proc = json.loads((tiny / "processor_config.json").read_text())
    assert proc["processor_class"] == "Qwen2_5_VLProcessor"
    assert proc["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert proc["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    pre = json.loads((tiny / "preprocessor_config.json").read_text())
    assert pre["min_pixels"] == pre["max_pixels"] == 168 * 168
    assert (tiny / "chat_template.jinja").exists() and (tiny / "model.safetensors").exists()


def test_tokenizer_has_qwen_special_tokens_and_template(tiny):
    m = load(tiny)
    tok = m.processor.tokenizer
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) is not None and tok.convert_tokens_to_ids(t) < len(tok)
    assert [tok.decode([i]) for i in tok.encode("[123, 45]", add_special_tokens=False)][1:4] == ["1", "2", "3"]
    text = m.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(m.processor, ImageOnlyQwen2_5_VLProcessor)


def test_generate_batched(tiny):
    m = load(tiny)
    img = Image.new("L", (300, 200), 90)
    outs = generate(m, [[img], [img, img]], ["Is there a nodule?", "Compare the two views."], max_new_tokens=5)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    ids = m.processor(text=["x"], images=None, return_tensors="pt")["input_ids"]
    assert ids.shape[0] == 1


def test_load_rejects_non_model_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="expected 'qwen2_5_vl'"):
        load(tmp_path)
