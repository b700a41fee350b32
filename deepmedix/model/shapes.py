"""Qwen2.5-VL shapes as plain dicts and the config they make: the released Qwen2.5-VL-7B-Instruct, built here
without its weights (the GPU benchmarks build it with random weights; ``deepmedix rehearse`` on the meta device to
plan memory)."""

from __future__ import annotations

# Qwen2.5-VL-7B-Instruct's config.json (text and vision), with the installed transformers' key names
# (``in_chans`` is ``in_channels`` there; ``rope_scaling`` is ``rope_parameters``).
QWEN25_VL_7B = {
    "text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
                 rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                 rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 24],
                                  "rope_theta": 1000000.0},
                 bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, hidden_act="silu",
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    "ids": dict(bos=151643, im_start=151644, im_end=151645, vision_start=151652, vision_end=151653, image=151655,
                video=151656, text_max=151643),  # ordinary BPE tokens are < 151643
}


def qwen_config(shape: dict):
    """A ``Qwen2_5_VLConfig`` of ``shape`` (``text``, ``vision`` and the special token ``ids``)."""
    from transformers import Qwen2_5_VLConfig

    ids = shape["ids"]
    return Qwen2_5_VLConfig(
        text_config=dict(shape["text"], pad_token_id=ids["bos"]),
        vision_config=dict(shape["vision"]),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], bos_token_id=ids["bos"], eos_token_id=ids["im_end"],
        pad_token_id=ids["bos"], tie_word_embeddings=False,
    )


def meta_model(shape: dict):
    """The model of ``shape`` on the meta device: every parameter's shape and dtype, no memory."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(shape), dtype=torch.bfloat16)
