"""The ``clinical`` reward, for report tasks only (neutral elsewhere): F1 of the 14 CheXpert observations that
:mod:`deepmedix.clinical` finds in the answer against those in the reference. Torch-free.
"""

from __future__ import annotations

from deepmedix import clinical, grounding
from deepmedix.rewards.paper import answer_kind, normalise


def is_report(task: str | None, truth: str) -> bool:
    """Report tasks (findings / impression generation); without a task name, a long free-text answer."""
    if task:
        return task.startswith("report")
    return answer_kind(truth or "") == "long"


def report_answer(output: str) -> str:
    """The report a completion gives: its boxed answer, else its text after the reasoning."""
    p = normalise(output or "")
    answer = grounding.last_boxed(p)
    if answer is not None:
        return answer
    return p.rsplit("</think>", 1)[-1].strip()


def clinical_components(output: str, truth: str, task: str | None = None,
                        uncertain: str = "positive") -> dict[str, float] | None:
    """CheXpert-observation F1 of the answer against the reference report; None for non-report tasks.

    One hardening over the labeller: an answer that mentions none of the observations earns no "No Finding" (the
    labeller gives it to any text without findings, so gibberish would match every normal study)."""
    if not is_report(task, truth):
        return None
    labels = clinical.label(report_answer(output))
    pred = clinical.positive_set(labels, uncertain)
    if all(v is None for k, v in labels.items() if k != "No Finding"):
        pred.discard("No Finding")
    ref = clinical.positive_set(clinical.label(truth or ""), uncertain)
    if not pred and not ref:
        return {"overall": 1.0}
    tp = len(pred & ref)
    return {"overall": 2 * tp / (len(pred) + len(ref))}

