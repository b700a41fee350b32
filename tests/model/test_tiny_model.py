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


def test_loads_a_checkpoint_in_the_released_7b_layout(tiny, tmp_path):
    """Qwen2.5-VL-7B-Instruct / DeepMedix-R1 ship a flat preprocessor_config.json and chat_template.json."""
    import shutil

    folder = tmp_path / "released"
    shutil.copytree(tiny, folder)
    for name in ("processor_config.json", "video_preprocessor_config.json"):
        (folder / name).unlink()
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    m = load(folder)
    assert (m.processor.image_processor.size.shortest_edge, m.processor.image_processor.size.longest_edge) == \
        (3136, 12845056)
    paper = load(folder, min_pixels=262144, max_pixels=262144)  # the paper's budget: 512 x 512
    feats = paper.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (512, 512))],
                            return_tensors="pt")
    h, w = feats["image_grid_thw"][0, 1:].tolist()
    assert h == w and (h * 14) ** 2 >= 262144 and ((h - 2) * 14) ** 2 < 262144
    assert generate(paper, [[Image.new("L", (512, 512))]], ["Is there a nodule?"], max_new_tokens=3)
