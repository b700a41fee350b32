"""The ``grounded`` reward: the reasoning's boxes matched to the record's reference boxes (model frame) by Hungarian
matching on IoU. ``iou`` is the matched pairs' mean IoU, ``count`` the count agreement (min/max of the two counts);
``soft`` mode gives ``iou_weight·iou + count_weight·count``, ``gemex`` mode gives 1 when the counts match and the
mean IoU is above ``gemex_iou`` (GEMeX-ThinkVG), else 0. Records without reference boxes are neutral (``None``:
TRL leaves them out of the sum). Torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from deepmedix import grounding
from deepmedix.errors import InputError
from deepmedix.rewards.paper import normalise


def ref_boxes(ref: Any, where: str = "boxes") -> list[list[float]]:
    """Reference boxes as lists of 4 floats; ValueError naming the field when they are not."""
    if ref is None:
        return []
    if not isinstance(ref, (list, tuple)):
        raise InputError(f"{where}: expected a list of [x1, y1, x2, y2] boxes, got {ref!r}")
    out = []
    for i, b in enumerate(ref):
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b):
            raise InputError(f"{where}[{i}]: expected 4 finite numbers [x1, y1, x2, y2], got {b!r}")
        out.append([float(v) for v in b])
    return out


def grounded_components(output: str, boxes: Any, mode: str = "soft", iou_weight: float = 0.5,
                        count_weight: float = 0.5, gemex_iou: float = 0.75, n_images: int = 1
                        ) -> dict[str, float] | None:
    """The reasoning's boxes against the reference boxes (both in the model frame); None without references.
    ``iou`` is the evaluation's mIoU: the matched IoUs summed over the larger of the two counts, so an extra or a
    missing box counts 0 (spraying boxes cannot raise it). With ``n_images`` views, only the boxes the reasoning
    puts on the first view (where the references are) count: :func:`deepmedix.grounding.reference_view_boxes`."""
    ref = ref_boxes(boxes)
    if not ref:
        return None
    pred, unplaced = grounding.reference_view_boxes(normalise(output or ""), n_images)
    iou = grounding.mean_matched_iou(pred, ref, unplaced)
    count = min(len(pred) + unplaced, len(ref)) / max(len(pred) + unplaced, len(ref))
    if mode == "gemex":
        value = 1.0 if len(pred) == len(ref) and iou > gemex_iou else 0.0
    else:
        value = iou_weight * iou + count_weight * count
    return {"iou": iou, "count": count, "overall": value}

