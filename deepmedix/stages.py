"""One function per pipeline stage. Components, the CLI and tests call these and nothing else.

Each takes artifact URIs (a local folder or ``s3://``), a config size or YAML path and ``KEY=VALUE`` overrides,
writes its output artifact atomically with lineage, and returns the stage's metrics: ``stage``, ``metric``,
``before``, ``after``, ``wall_s`` (plus stage-specific details).
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import ConfigError, load_config

Progress = Callable[[int, int], None]


def curate(out: str, size: str = "tiny", overrides: list[str] | None = None, progress: Progress | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from deepmedix.data.curate import curate as run

    return run(load_config("curate", size, overrides), out, progress, log or print)


def dataset_card(dataset: str, log: Callable[[str], None] | None = None) -> str | None:
    """Write the dataset card (:mod:`deepmedix.data.card`) into ``DATASET/card`` (a folder or ``s3://`` prefix) and
    name it in the dataset's lineage (:func:`deepmedix.data.card.publish_card`): what ``deepmedix curate`` does
    after publishing a dataset. A card that cannot be drawn costs the dataset
    nothing: it is logged and None returned (the curated records are already published and complete)."""
    from deepmedix.data.card import publish_card

    try:
        out = publish_card(dataset)
    except Exception as exc:  # noqa: BLE001 - the card is a view of the data, never a reason to lose it
        (log or print)(f"warning: no dataset card for {dataset}: {type(exc).__name__}: {exc}")
        return None
    (log or print)(f"dataset card: {out}/card.md")
    return out


def card_html(dataset: str, html_path: str) -> None:
    """The dataset card (:mod:`deepmedix.data.card`) of a curated dataset as one self-contained HTML file: what the
    pipeline's curate step logs as its KFP HTML artifact, which the KFP UI shows."""
    import tempfile
    from pathlib import Path

    from deepmedix.data.card import card_html as to_html
    from deepmedix.data.card import write_card

    tmp = Path(tempfile.mkdtemp(prefix="deepmedix-card-"))
    try:
        write_card(dataset, str(tmp / "card"))
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(to_html(tmp / "card"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def base_model(data: str, out: str, size: str = "tiny", overrides: list[str] | None = None,
               model_uri: str = "") -> dict[str, Any]:
    """The stage-1 starting point: a given checkpoint (path or ``s3://``), or the tiny model built here with a
    tokenizer trained on the curated training text."""
    from deepmedix.data.schema import load_records
    from deepmedix.grounding import build_prompt
    from deepmedix.model.load import check_model_folder
    from deepmedix.model.tiny import build_tiny

    t0 = time.time()
    cfg = load_config("model", size, overrides)
    if cfg.build not in ("tiny", "checkpoint"):
        raise ConfigError(f"model config: key 'build' must be tiny or checkpoint, got {cfg.build!r}")
    if cfg.build == "checkpoint" and not model_uri:
        raise ConfigError(f"model config {size!r}: build: checkpoint needs a model to start from (the pipeline's "
                          f"base_model_uri): a Qwen2.5-VL-7B-Instruct folder or s3:// URI")
    with store.atomic_dir(out) as folder:
        if model_uri:
            src = store.fetch(model_uri)
            check_model_folder(src)
            shutil.copytree(src, folder, dirs_exist_ok=True)
            inputs = {"data": data, "model": model_uri}
        else:
            records = load_records(store.fetch(data), "train")
            texts = [t for r in records for t in (build_prompt(r.prompt), r.answer)]
            build_tiny(folder, cfg, texts)
            inputs = {"data": data}
        n_params = _count_params(folder)
        store.write_lineage(folder, "base_model", cfg, inputs=inputs, extra={"params": n_params})
    return {"stage": "base_model", "metric": "params", "before": None, "after": n_params, "wall_s": time.time() - t0}


def _count_params(folder) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(store.local_path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def sft(data: str, model: str, out: str, size: str = "tiny", overrides: list[str] | None = None,
        resume: bool = False) -> dict[str, Any]:
    from deepmedix.train.sft import train_sft

    return train_sft("sft", load_config("sft", size, overrides), data, model, out, resume=resume)


def coldstart_synth(data: str, out: str, size: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    from deepmedix.synth.synthesize import synthesize

    t0 = time.time()
    report = synthesize(load_config("coldstart", size, overrides), data, out)
    return {"stage": "coldstart_synth", "metric": "traces_kept", "before": None, "after": report["kept"],
            "dropped": report["dropped"], "wall_s": time.time() - t0}


def coldstart_sft(traces: str, model: str, out: str, size: str = "tiny", overrides: list[str] | None = None,
                  resume: bool = False) -> dict[str, Any]:
    from deepmedix.train.coldstart import train_coldstart

    return train_coldstart(load_config("coldstart", size, overrides), traces, model, out, resume=resume)


def grpo(data: str, model: str, out: str, size: str = "tiny", overrides: list[str] | None = None,
         resume: bool = False) -> dict[str, Any]:
    from deepmedix.train.grpo import train_grpo

    return train_grpo(load_config("grpo", size, overrides), data, model, out, resume=resume)


def evaluate(data: str, model: str, out: str, size: str = "tiny", overrides: list[str] | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    from deepmedix.eval.run import evaluate as run

    return run(load_config("eval", size, overrides), data, model, out, progress)


def log_kfp(metrics_artifact, result: dict[str, Any]) -> None:
    """Log a stage's numbers on a KFP ``Metrics`` artifact (numbers only; ``before``/``after`` keep their names)."""
    for key in ("before", "after", "wall_s"):
        if isinstance(result.get(key), (int, float)):
            metrics_artifact.log_metric(key, float(result[key]))
    for key, value in (result.get("scores") or {}).items():
        if isinstance(value, (int, float)):
            metrics_artifact.log_metric(key.replace("/", "_").replace("@", "_at_"), float(value))
    metrics_artifact.metadata["stage"] = result.get("stage", "")
    metrics_artifact.metadata["metric"] = result.get("metric", "")
