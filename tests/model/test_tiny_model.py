from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from deepmedix.errors import ModelLoadError
from deepmedix.model.generate import generate
from deepmedix.model.load import load
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


def _queries():
    """Queries of different lengths, image counts and image sizes (so a batch needs left padding)."""
    rng = np.random.default_rng(0)

    def img(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")

    return [([img(300, 200)], "Is there a nodule?"),
            ([img(64, 64), img(120, 90)], "Compare the two views and describe every change since the prior study."),
            ([img(200, 300)], "Findings?"),
            ([img(512, 512)], "Which abnormality is seen in the left lower zone, if any, and how large is it?")]


def test_batched_generation_equals_one_at_a_time(tiny):
    """Greedy decoding of a left-padded batch gives each query the tokens it gets alone. Where the two differ, the
    query's own run must have had a tie there (its top two logits within float noise); anything else is a padding
    or image-alignment fault."""
    import torch

    from deepmedix.data.records import open_image
    from deepmedix.model.generate import chat_prompts, eos_token_ids, generate_batch

    m = load(tiny)
    queries, budget = _queries(), 12
    got = [[] for _ in queries]
    gens = generate_batch(m, [q[0] for q in queries], [q[1] for q in queries], budget,
                          on_token=lambda row, tok: got[row].append(tok))
    compared = 0
    for k, (images, question) in enumerate(queries):
        text = chat_prompts(m.processor, [question], [len(images)])[0]
        inputs = m.processor(text=[text], images=[open_image(i, m.frame()) for i in images], return_tensors="pt")
        with torch.no_grad():
            out = m.model.generate(**inputs, max_new_tokens=budget, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
        alone = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        alone = [t for t in alone if t not in eos_token_ids(m)][:len(got[k])]
        assert gens[k].prompt_tokens == inputs["input_ids"].shape[1]
        for i, (a, b) in enumerate(zip(alone, got[k])):
            if a != b:
                top2 = torch.topk(out.scores[i][0].float(), 2).values
                assert top2[0] - top2[1] < 1e-4, f"query {k}, token {i}: alone {a}, batched {b}, margin {top2}"
                break
            compared += 1
    assert compared >= 2 * budget  # most tokens were compared, not cut short by ties
    assert len({tuple(g) for g in got}) > 1  # the queries got different answers: a row mix-up would show


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
