"""Generation: chat prompts, one batched ``generate`` with per-row budgets, streaming and early stops (what the
model server runs), and greedy answers for a list of curated records (what evaluation and the trainers' held-out
checks run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from deepmedix.data.records import open_image, record_images
from deepmedix.data.schema import Record
from deepmedix.grounding import Frame, user_message
from deepmedix.model.load import Loaded


def chat_prompts(processor, questions: list[str], n_images: list[int], systems: list[str | None] | None = None,
                 reasoning: bool = True) -> list[str]:
    """Chat-template prompts; ``systems[i]`` (when given) replaces the template's default system prompt;
    ``reasoning=False`` leaves the reasoning instruction out (the prompt stage-1 SFT trains on)."""
    systems = systems or [None] * len(questions)
    return [processor.apply_chat_template(([{"role": "system", "content": [{"type": "text", "text": sys_}]}]
                                           if sys_ else []) + [user_message(q, n, reasoning)],
                                          add_generation_prompt=True, tokenize=False)
            for q, n, sys_ in zip(questions, n_images, systems)]


@dataclass
class Generation:
    """One output of :func:`generate_batch`: the decoded text and its token counts."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (token budget spent)


def eos_token_ids(loaded: Loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


def _generation(proc, row: list[int], budget: int, eos_ids: set[int], n_prompt: int) -> Generation:
    """A row's new tokens -> its Generation: cut at its budget and after its first end-of-sequence token."""
    row = row[:budget]
    end = next((k for k, t in enumerate(row) if t in eos_ids), None)
    n = len(row) if end is None else end + 1
    text = proc.decode(row[:n], skip_special_tokens=True).strip()
    return Generation(text, int(n_prompt), n, "length" if end is None else "stop")


class _Rows:
    """``generate``'s streamer and a per-row stopping criterion in one: follows each row's new tokens, hands
    them to ``on_token(row, token_id)``, and calls ``on_done(row, Generation)`` as soon as a row ends (its end of
    sequence or its own budget), while the rest of the batch goes on. A row ends early when ``stop_row(row)``
    says so (its caller is gone); ``generate`` stops once every row has ended."""

    def __init__(self, proc, budgets, eos_ids, prompt_lens, on_token=None, on_done=None, stop_row=None):
        self.proc, self.budgets, self.eos_ids, self.prompt_lens = proc, budgets, eos_ids, prompt_lens
        self.on_token, self.on_done, self.stop_row = on_token, on_done, stop_row
        self.ids = [[] for _ in budgets]
        self.ended = [False] * len(budgets)
        self.gens: list[Generation | None] = [None] * len(budgets)
        self.prompt_seen = False

    def _end(self, k: int) -> None:
        self.ended[k] = True
        self.gens[k] = _generation(self.proc, self.ids[k], self.budgets[k], self.eos_ids, self.prompt_lens[k])
        if self.on_done is not None:
            self.on_done(k, self.gens[k])

    # streamer protocol
    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        for k, tok in enumerate(value.reshape(len(self.budgets), -1)[:, -1].tolist()):
            if self.ended[k]:
                continue
            self.ids[k].append(tok)
            if tok not in self.eos_ids and self.on_token is not None:
                self.on_token(k, tok)
            if tok in self.eos_ids or len(self.ids[k]) >= self.budgets[k]:
                self._end(k)

    def end(self) -> None:
        for k in range(len(self.budgets)):
            if not self.ended[k]:
                self._end(k)

    # stopping criterion protocol (a StoppingCriteria is any callable returning one bool per row)
    def __call__(self, input_ids, scores, **kwargs):
        if self.stop_row is not None:
            for k in range(len(self.budgets)):
                if not self.ended[k] and self.stop_row(k):
                    self._end(k)
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(loaded: Loaded, images: list[list[Image.Image]], questions: list[str],
                   max_new_tokens: int | list[int] = 256, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, frame: Frame | str | None = "auto", systems: list[str | None] | None = None,
                   on_token=None, on_done=None, stop_row=None, reasoning: bool = True) -> list[Generation]:
    """One batched ``generate`` over several queries (each one or more images and a task text; the instruction
    is added). ``max_new_tokens`` may be one budget per query: each row stops at its own budget (the batch runs
    until every row has ended). ``on_token(row, token_id)`` streams; ``on_done(row, Generation)`` reports a row
    as soon as it ends; ``stop_row(row) -> bool`` ends a row early (its output is then cut short). Sampling
    settings the call does not name (``top_k``, ``repetition_penalty``, ...) come from the model's
    ``generation_config.json``, as in vLLM's OpenAI server. ``frame`` prepares the images for the box frame the
    answers are read in (``auto``: the one the model folder was trained in, :meth:`Loaded.frame`)."""
    from transformers import StoppingCriteriaList

    budgets = [int(max_new_tokens)] * len(questions) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    proc = loaded.processor
    texts = chat_prompts(proc, questions, [len(i) for i in images], systems, reasoning)
    # bound to this processor's patch size and pixel budget; None: the images are sized already (serving sizes a
    # request's image once, when it is parsed — EasyR1's resize is not idempotent, so it must run exactly once)
    fr = loaded.frame(frame) if frame is not None else None
    flat = [open_image(im, fr) for ims in images for im in ims]
    inputs = proc(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(loaded.device)
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    eos_ids = eos_token_ids(loaded)
    prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
    rows = _Rows(proc, budgets, eos_ids, prompt_lens, on_token, on_done, stop_row)
    loaded.model.generate(**inputs, max_new_tokens=max(budgets), streamer=rows,
                          stopping_criteria=StoppingCriteriaList([rows]), **kwargs)
    rows.end()  # generate calls it too; rows that ended are left as they are
    return rows.gens


def generate(loaded: Loaded, images: list[list[Image.Image]], questions: list[str], max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, frame: Frame | str = "auto",
             reasoning: bool = True) -> list[str]:
    """One batched ``generate``: each query is one or more images and a task text (the instruction is added
    unless ``reasoning=False``)."""
    return [g.text for g in generate_batch(loaded, images, questions, max_new_tokens, do_sample=do_sample,
                                           temperature=temperature, frame=frame, reasoning=reasoning)]


def batched(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def generate_on(loaded, root: Path, records: list[Record], max_new_tokens: int, batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None, frame: Frame | str = "auto") -> list[str]:
    """Greedy generation with the reasoning prompt for each record; returns raw outputs in order."""
    outs: list[str] = []
    for chunk in batched(records, batch_size):
        outs.extend(generate(loaded, [record_images(root, r, None) for r in chunk], [r.prompt for r in chunk],
                             max_new_tokens=max_new_tokens, frame=frame))
        if progress:
            progress(len(outs), len(records))
    return outs
