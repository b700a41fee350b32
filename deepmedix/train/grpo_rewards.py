"""The rewards (:mod:`deepmedix.rewards`) as TRL reward functions for GRPO.

Each component of a :class:`~deepmedix.rewards.spec.RewardSpec` becomes one :class:`ComponentReward`: a picklable
callable instance, as TRL's own parameterised rewards are, named after its component (TRL names a callable by its
``__name__``, else its class: ``get_callable_name`` in trl/trainer/utils.py) so that TRL logs
``rewards/<name>/mean``; its weight goes to ``GRPOConfig.reward_weights``. Its parts are logged through the
``log_metric`` keyword TRL passes (``rewards/<name>/<part>``).

A generation batch's scores are gathered by :class:`BatchScores` for the rollout sample. ``_calculate_rewards`` in
trl/trainer/grpo_trainer.py calls the synchronous reward functions one after another, in the order given, on the
same batch, so the first component opens a batch and the last one closes it; no object identity is involved.
"""

from __future__ import annotations

from typing import Any, Callable

from deepmedix.errors import InputError
from deepmedix.rewards.spec import RewardSpec


def completion_text(c: Any) -> str:
    """The text of one completion: a plain string, or the last assistant turn of a conversation."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return _content_text(c.get("content"))
    msgs = list(c)
    if not msgs:
        return ""
    if all(isinstance(m, str) for m in msgs):
        return "".join(msgs)
    assistant = [m for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
    msg = assistant[-1] if assistant else msgs[-1]
    return _content_text(msg.get("content") if isinstance(msg, dict) else msg)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # multimodal content parts: [{"type": "text", "text": "..."}, ...]
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, dict) and p.get("type", "text") == "text":
            parts.append(str(p.get("text", "")))
    return "".join(parts)


class BatchScores:
    """Gathers one batch's rows from every component, in the spec's order, and hands the whole batch to
    ``on_scores`` when the last component is in."""

    def __init__(self, spec: RewardSpec, on_scores: Callable[[dict], None]):
        self.names, self.weights, self.on_scores = list(spec.weights), dict(spec.weights), on_scores
        self.scores: dict[str, list] = {}

    def add(self, name: str, rows: list, completions: list, answer: list[str], tasks: list, kw: dict) -> None:
        if name == self.names[0]:
            self.scores = {}
        self.scores[name] = rows
        if name == self.names[-1] and list(self.scores) == self.names:
            self.on_scores({"completions": [completion_text(c) for c in completions], "answer": list(answer),
                            "task": list(tasks), "scores": self.scores, "weights": dict(self.weights), "kwargs": kw})


class ComponentReward:
    """One component of a spec as a TRL reward function: one score per completion (``None`` where the component
    does not apply: TRL leaves it out of the sum)."""

    def __init__(self, spec: RewardSpec, name: str, batch: BatchScores | None = None):
        self.spec, self.name, self.batch = spec, name, batch
        self.__name__ = name

    def __call__(self, completions: list, answer: list[str], ref_boxes_frame: list | None = None,
                 task: list[str] | None = None, log_metric: Callable | None = None, **kw) -> list[float | None]:
        n = len(completions)
        if len(answer) != n:
            raise InputError(f"reward {self.name}: {n} completions but {len(answer)} answers")
        boxes = ref_boxes_frame if ref_boxes_frame is not None else [None] * n
        tasks = task if task is not None else [None] * n
        # each row's image count (TRL passes the dataset's other columns: the decoded ``images`` per prompt,
        # trl/trainer/grpo_trainer.py _calculate_rewards): boxes on another view than the references' do not count
        imgs = kw.get("images") if kw.get("images") is not None else kw.get("image_sizes")
        views = [len(x) if isinstance(x, (list, tuple)) else 1 for x in imgs] if imgs is not None else [1] * n
        rows = [self.spec.component(self.name, completion_text(c), a, b, t, v)
                for c, a, b, t, v in zip(completions, answer, boxes, tasks, views)]
        if log_metric is not None:
            for part in sorted({k for r in rows if r for k in r} - {"overall"}):
                vals = [r[part] for r in rows if r]
                log_metric(f"rewards/{self.name}/{part}", sum(vals) / len(vals))
        if self.batch is not None:
            self.batch.add(self.name, rows, completions, answer, tasks, kw)
        return [None if r is None else r["overall"] for r in rows]


def trl_reward_functions(spec: RewardSpec, on_scores: Callable[[dict], None] | None = None
                         ) -> tuple[list[ComponentReward], list[float]]:
    """One TRL reward function per component of ``spec`` and their weights; ``on_scores`` gets each batch's scores
    once every component is in (the rollout sample)."""
    batch = BatchScores(spec, on_scores) if on_scores is not None else None
    names = list(spec.weights)
    return [ComponentReward(spec, n, batch) for n in names], [float(spec.weights[n]) for n in names]
