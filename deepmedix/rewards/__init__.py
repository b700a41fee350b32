"""Rule-based rewards: pure, torch-free scorers of one output against one record.

* ``paper`` / ``paper-words`` (:mod:`.paper`) — the released DeepMedix-R1 reward, bit-exact, and its word-level
  variant;
* ``grounded`` (:mod:`.grounded`) — the reasoning's boxes against the record's reference boxes;
* ``clinical`` (:mod:`.clinical`) — CheXpert-observation F1 of a report against the reference report;
* a weighted composite of them (:class:`~deepmedix.rewards.spec.RewardSpec`, ``configs/rewards/*.yaml``).

Each returns its components, ``overall`` among them. GRPO wraps them as TRL reward functions
(:mod:`deepmedix.train.grpo_rewards`); evaluation, cold-start filtering and ``deepmedix reward score`` use them as
they are.
"""

from __future__ import annotations

from deepmedix.data.schema import Record
from deepmedix.grounding import DEFAULT_FRAME, Frame
from deepmedix.rewards.spec import RewardSpec


def score(name: str | RewardSpec, output: str, record: Record, frame: Frame = DEFAULT_FRAME) -> dict[str, float | None]:
    """Score ``output`` against ``record`` with the reward ``name`` (a component, a composite under
    ``configs/rewards/``, a YAML file or inline weights — see :meth:`RewardSpec.parse`) or a spec: every component
    and ``overall``."""
    spec = name if isinstance(name, RewardSpec) else RewardSpec.parse(name)
    return spec.score_record(output, record, frame)
