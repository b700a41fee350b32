"""Stage 2, the cold start: SFT on the kept teacher traces (:mod:`deepmedix.synth` writes them), with the
reasoning instruction in the prompt, teaches the output grammar."""

from __future__ import annotations

from typing import Any

from deepmedix.config import ColdStartConfig


def train_coldstart(cfg: ColdStartConfig, traces_uri: str, model_uri: str, out_uri: str,
                    resume: bool = False) -> dict[str, Any]:
    """SFT on the kept traces, with the reasoning instruction in the prompt. Metric: held-out loss."""
    from deepmedix.data.records import trace_in_frame
    from deepmedix.train.sft import train_sft

    # traces cite boxes in the pixels of the record's first image; the model learns them in its own frame
    return train_sft("coldstart", cfg, traces_uri, model_uri, out_uri,
                     targets_for=lambda r, frame: trace_in_frame(r.trace, r, frame), reasoning=True, resume=resume)
