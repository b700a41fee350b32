"""Instruction wording for curated records, shared by the phantom generator and the real-dataset adapters.

The choice among paraphrases is a pure function of a key (the record id), so a rerun writes the same records.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from deepmedix.data.phantom_text import FINDINGS_PROMPTS, IMPRESSION_PROMPTS

__all__ = ["FINDINGS_PROMPTS", "IMPRESSION_PROMPTS", "pick", "findings_prompt", "impression_prompt",
           "grounding_prompt", "phrase_grounding_prompt"]


def pick(options: Sequence[str], key: str) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return options[h % len(options)]


def findings_prompt(key: str) -> str:
    return pick(FINDINGS_PROMPTS, key)


def impression_prompt(key: str) -> str:
    return pick(IMPRESSION_PROMPTS, key)


def grounding_prompt(label: str) -> str:
    """A finding class (VinDr-CXR, ChestX-ray14, phantom): same wording as the phantom set."""
    return f"Locate the {label.lower()} in this image."


def phrase_grounding_prompt(phrase: str) -> str:
    """A free-text phrase (MS-CXR)."""
    return f'Locate the region described as "{phrase.strip()}" in this image.'
