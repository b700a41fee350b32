"""Which rewards, with which weights and settings (:class:`RewardSpec`), and scoring a JSONL file of predictions.

``overall`` is the weighted sum of the components that apply to a record; a neutral one (``None``) adds nothing.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from deepmedix import store
from deepmedix.data.records import frame_boxes
from deepmedix.data.schema import Record
from deepmedix.errors import InputError
from deepmedix.grounding import DEFAULT_FRAME, Frame
from deepmedix.rewards.clinical import clinical_components
from deepmedix.rewards.grounded import grounded_components, ref_boxes
from deepmedix.rewards.paper import paper_components

COMPONENTS = ("paper", "paper-words", "grounded", "clinical")
REWARD_DIR = Path(__file__).resolve().parents[2] / "configs" / "rewards"
_SPEC_KEYS = {"weights", "grounded_mode", "grounded_iou_weight", "grounded_count_weight", "grounded_gemex_iou",
              "clinical_uncertain"}


@dataclass
class RewardSpec:
    """Which rewards, with which weights and settings. ``overall`` is the weighted sum of the components that
    apply to a record (a neutral one — ``None`` — adds nothing)."""
    weights: dict[str, float] = field(default_factory=lambda: {"paper": 1.0})
    grounded_mode: str = "soft"          # soft: iou_weight * IoU + count_weight * count agreement; gemex: 0/1
    grounded_iou_weight: float = 0.5
    grounded_count_weight: float = 0.5
    grounded_gemex_iou: float = 0.75     # gemex: the counts match and the mean matched IoU is above this
    clinical_uncertain: str = "positive"  # uncertain CheXpert mentions count as positive, negative or ignore
    name: str = "paper"

    def __post_init__(self) -> None:
        if not self.weights:
            raise InputError(f"reward {self.name}: no components (known: {', '.join(COMPONENTS)})")
        for k, w in self.weights.items():
            if k not in COMPONENTS:
                raise InputError(f"reward {self.name}: unknown component {k!r} (known: {', '.join(COMPONENTS)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise InputError(f"reward {self.name}: weight of {k!r} must be a number, got {w!r}")
        for key in ("grounded_iou_weight", "grounded_count_weight", "grounded_gemex_iou"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"reward {self.name}: {key} must be a number, got {v!r}")
        if not 0.0 <= self.grounded_gemex_iou <= 1.0:
            raise InputError(f"reward {self.name}: grounded_gemex_iou must be within 0..1, got "
                             f"{self.grounded_gemex_iou}")
        if self.grounded_mode not in ("soft", "gemex"):
            raise InputError(f"reward {self.name}: grounded_mode must be 'soft' or 'gemex', got {self.grounded_mode!r}")
        if self.clinical_uncertain not in ("positive", "negative", "ignore"):
            raise InputError(f"reward {self.name}: clinical_uncertain must be positive, negative or ignore, got "
                             f"{self.clinical_uncertain!r}")

    @classmethod
    def parse(cls, spec: str, **settings: Any) -> "RewardSpec":
        """``spec`` is a component name (``paper``), a composite's name under ``configs/rewards/``, a YAML file
        (``weights:`` plus any of the settings), or inline weights (``paper=1,grounded=0.5``). ``settings`` are
        defaults that a composite file's own settings override."""
        spec = (spec or "").strip()
        if spec in COMPONENTS:
            return cls(weights={spec: 1.0}, name=spec, **settings)
        path = Path(spec) if spec.endswith((".yaml", ".yml")) else REWARD_DIR / f"{spec}.yaml"
        if path.is_file():
            return cls._from_file(path, settings)
        if "=" in spec:
            weights = {}
            for part in spec.split(","):
                k, _, v = part.partition("=")
                if k.strip() in weights:
                    raise InputError(f"reward {spec!r}: {k.strip()!r} is given twice")
                try:
                    weights[k.strip()] = float(v)
                except ValueError:
                    raise InputError(f"reward {spec!r}: {part.strip()!r} is not NAME=WEIGHT") from None
            return cls(weights=weights, name=spec, **settings)
        known = sorted(COMPONENTS) + sorted(p.stem for p in REWARD_DIR.glob("*.yaml"))
        raise InputError(f"unknown reward {spec!r}: expected one of {', '.join(known)}, a YAML file, or inline "
                         f"weights such as paper=1,grounded=0.5")

    @classmethod
    def _from_file(cls, path: Path, settings: dict[str, Any]) -> "RewardSpec":
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"{path}: not a readable YAML reward file ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping with 'weights', got {type(data).__name__}")
        unknown = set(data) - _SPEC_KEYS
        if unknown:
            raise InputError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_SPEC_KEYS))})")
        if not isinstance(data.get("weights"), dict):
            raise InputError(f"{path}: 'weights' must map component names to weights, e.g. {{paper: 1.0}}")
        try:
            return cls(**{**settings, **data, "name": path.stem})
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None

    @classmethod
    def from_config(cls, cfg: Any) -> "RewardSpec":
        """From a stage config: ``reward`` (a name, composite or file), then what the config itself sets wins —
        ``reward_weights`` when given, and every setting changed from the config's default (a composite file's
        settings beat the defaults, not the run's own choices)."""
        keys = [f.name for f in fields(cls) if f.name not in ("weights", "name") and hasattr(cfg, f.name)]
        defaults = type(cfg)()
        base = cls.parse(cfg.reward, **{k: getattr(cfg, k) for k in keys})
        changes = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != getattr(defaults, k)}
        weights = getattr(cfg, "reward_weights", None)
        if weights:
            changes.update(weights=dict(weights), name="+".join(weights))
        return dataclasses.replace(base, **changes)

    # -- scoring

    def component(self, name: str, output: str, truth: str, boxes: Any = None,
                  task: str | None = None, n_images: int = 1) -> dict[str, float] | None:
        if name == "paper":
            return paper_components(output, truth)
        if name == "paper-words":
            return paper_components(output, truth, True)
        if name == "grounded":
            return grounded_components(output, boxes, self.grounded_mode, self.grounded_iou_weight,
                                       self.grounded_count_weight, self.grounded_gemex_iou, n_images)
        return clinical_components(output, truth, task, self.clinical_uncertain)

    def score(self, output: str, truth: str, boxes: Any = None, task: str | None = None,
              n_images: int = 1) -> dict[str, float | None]:
        """Every component (``name`` and ``name/part``) and ``overall``, for one output."""
        out: dict[str, float | None] = {}
        total = None  # None when no component applies (TRL leaves such a completion out, too)
        for name, w in self.weights.items():
            parts = self.component(name, output, truth, boxes, task, n_images)
            out[name] = None if parts is None else parts["overall"]
            for k, v in (parts or {}).items():
                if k != "overall":
                    out[f"{name}/{k}"] = v
            if parts is not None:
                total = (total or 0.0) + w * parts["overall"]
        out["overall"] = total
        return out

    def score_record(self, output: str, record: Record, frame: Frame = DEFAULT_FRAME) -> dict[str, float | None]:
        """:meth:`score` against a curated record: its answer, its boxes in ``frame`` (the frame the output's boxes
        are in: the model's processor's, e.g. :meth:`deepmedix.model.load.Loaded.frame`), its task."""
        return self.score(output, record.answer, frame_boxes(record, frame), record.task, len(record.images))


# ---------------------------------------------------------------- scoring files (the CLI)

def read_score_rows(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSONL file to score, checked: each an object with string ``prediction`` and
    ``ground_truth`` (``boxes``: a list of [x1, y1, x2, y2] in the model frame, ``task``: optional)."""
    rows = []
    for _, where, row in store.jsonl_objects(path):
        for key in ("prediction", "ground_truth"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{where}: field {key!r} must be a string, got {row.get(key)!r}")
        if row.get("task") is not None and not isinstance(row["task"], str):
            raise InputError(f"{where}: field 'task' must be a string, got {row['task']!r}")
        row["boxes"] = ref_boxes(row.get("boxes"), f"{where}: field 'boxes'") if row.get("boxes") is not None else None
        rows.append(row)
    return rows


def score_rows(spec: RewardSpec, rows: Iterable[dict[str, Any]]) -> Iterable[dict[str, float | None]]:
    for r in rows:
        yield spec.score(r["prediction"], r["ground_truth"], r.get("boxes"), r.get("task"), r.get("n_images") or 1)
