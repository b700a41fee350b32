"""The tiny Qwen2.5-VL, built locally: random init, a byte-level BPE tokenizer trained here with the Qwen special
tokens and chat template, and an image processor at a small pixel budget. Same classes as the 7B."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from deepmedix.config import ModelConfig
from deepmedix.grounding import INSTRUCTION, format_output
from deepmedix.model.processor import CHAT_TEMPLATE, ImageOnlyQwen2_5_VLProcessor

# Qwen2's special tokens, in Qwen2's order (ids 0.. here; a real checkpoint has them after its BPE vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split: digits one by one, so box coordinates tokenise the same way as in the 7B.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

BASE_CORPUS = [
    INSTRUCTION,
    "You are a helpful assistant.",
    format_output([("the heart is enlarged", [[120, 250, 390, 430]])], "cardiomegaly"),
    "The answer is: yes | no | PA | AP | left | right | upper | middle | lower | mild | moderate | severe",
    "No acute cardiopulmonary process. The lungs are clear. There is no pleural effusion or pneumothorax.",
    "Please act as an experienced radiologist and generate the \"FINDINGS\" section of an X-ray report.",
    "0 1 2 3 4 5 6 7 8 9 [ ] , ; | { } \\boxed",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Qwen2TokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(BASE_CORPUS) + [t for t in texts if t]
    tok.train_from_iterator(corpus * 2, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(cfg: ModelConfig, tokenizer) -> Qwen2_5_VLConfig:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    half = head_dim // 2  # mrope sections (temporal, height, width) cover half the rotary dims
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": section,
                             "rope_theta": 1000000.0},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
            num_heads=cfg.vision_num_heads, out_hidden_size=cfg.hidden_size, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[cfg.vision_depth - 1],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def build_tiny(out_dir: str | Path, cfg: ModelConfig | None = None, texts: Iterable[str] = ()) -> Path:
    """Build and save the tiny model folder at ``out_dir`` (not atomic: callers use ``store.atomic_dir``)."""
    cfg = cfg or ModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=CHAT_TEMPLATE)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(cfg, tokenizer))
    ids = tokenizer.convert_tokens_to_ids
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        ids("<|endoftext|>"), [ids("<|im_end|>"), ids("<|endoftext|>")], ids("<|endoftext|>"))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
