"""``make demo``: the whole pipeline under ``kfp.local`` (subprocess runner, tiny model, phantom data, a local
pipeline root), then the trained model served by the KServe model server on localhost and asked one question."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepmedix.errors import DemoError
from pipelines.deepmedix_pipeline import STAGE_TASKS
from serving.local import free_port, stop_process, wait_ready

console = Console()


def run_pipeline_local(pipeline_root: Path, **arguments) -> Path:
    """Run the pipeline with ``kfp.local``; return the run's folder under ``pipeline_root``."""
    from kfp import local

    from pipelines.deepmedix_pipeline import deepmedix_pipeline

    if pipeline_root.exists():
        shutil.rmtree(pipeline_root)
    pipeline_root.mkdir(parents=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    deepmedix_pipeline(**arguments)
    runs = sorted(p for p in pipeline_root.iterdir() if p.is_dir())
    if len(runs) != 1:
        raise DemoError(f"{pipeline_root}: expected one pipeline run folder, found {len(runs)}")
    return runs[0]


def stage_metrics(run: Path) -> list[dict[str, Any]]:
    """Each stage's numbers as its component logged them on its ``metrics`` artifact."""
    rows = []
    for task in STAGE_TASKS:
        path = run / task / "executor_output.json"
        if not path.exists():
            raise DemoError(f"{path}: stage '{task}' did not finish")
        arts = json.loads(path.read_text()).get("artifacts", {}).get("metrics", {}).get("artifacts", [])
        if not arts:
            raise DemoError(f"{path}: stage '{task}' logged no metrics")
        rows.append({"task": task, **arts[0].get("metadata", {})})
    return rows


def serve_and_ask(model_dir: Path, data_dir: Path, out_png: Path) -> dict[str, Any]:
    """Start the KServe model server on the trained model, send one v1 request, draw the boxes it returns."""
    import requests
    from PIL import Image

    from deepmedix.data.schema import load_records
    from deepmedix.viz import draw_overlay

    rec = next((r for r in load_records(data_dir, "test", tasks=["grounding"])), None) \
        or load_records(data_dir, "test")[0]
    image_path = data_dir / rec.images[0]
    port = free_port()
    log = out_png.with_suffix(".server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--model", str(model_dir), "--port", str(port),
                             "--name", "deepmedix"], stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        wait_ready(f"http://127.0.0.1:{port}/v1/models/deepmedix", proc)
        startup = time.time() - t0
        payload = {"instances": [{"image": base64.b64encode(image_path.read_bytes()).decode(), "question": rec.prompt}]}
        t1 = time.time()
        resp = requests.post(f"http://127.0.0.1:{port}/v1/models/deepmedix:predict", json=payload, timeout=300)
        latency = time.time() - t1
        resp.raise_for_status()
        answer = resp.json()["predictions"][0]
        pred = {"text": answer["text"], **answer["grounding"]}
    finally:
        stop_process(proc, 20)
        log.close()
    with Image.open(image_path) as im:
        labels = [f"step {i + 1}" for i, s in enumerate(pred["steps"]) for _ in s["boxes"]]
        refs = [b.box for b in rec.boxes]
        draw_overlay(im, pred["boxes"] + refs, labels + [f"reference: {b.label}" for b in rec.boxes], out_png)
    return {"record": rec, "prediction": pred, "latency_s": latency, "startup_s": startup}


HELD_OUT = (("vqa_accuracy", "VQA accuracy"), ("grounding_miou", "grounding mIoU"),
            ("format_compliance", "format compliance"), ("paper_reward", "paper reward"))


def held_out(run: Path, out: Path) -> list[tuple[str, dict, dict]]:
    """Each training stage's held-out (test split) scores before and after it: (stage, before, after). The pipeline
    evaluates the cold-start and final models; the base and stage-1 models are evaluated here with the same eval
    config (a stage-1 model in the plain prompt it was trained on: eval ``prompt: auto``)."""
    from deepmedix import stages

    data = str(run / "curate" / "data")
    scores = {}
    for name in ("base-model", "sft"):
        dest = out / f"evaluate-{name}"
        if dest.exists():
            shutil.rmtree(dest)
        scores[name] = stages.evaluate(data, str(run / name / "model"), str(dest), "tiny")["scores"]
    for name, task in (("coldstart", "evaluate-coldstart"), ("grpo", "evaluate")):
        scores[name] = json.loads((run / task / "results" / "metrics.json").read_text())["scores"]
    return [("sft", scores["base-model"], scores["sft"]), ("coldstart", scores["sft"], scores["coldstart"]),
            ("grpo", scores["coldstart"], scores["grpo"])]


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "—"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(run_dir: str = "runs/demo") -> None:
    run_dir_p = Path(run_dir).resolve()
    run_dir_p.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    console.rule("[bold]DeepMedix demo: the KFP pipeline under kfp.local")
    run = run_pipeline_local(run_dir_p / "pipeline_root")
    pipeline_s = time.time() - t0
    rows = stage_metrics(run)
    console.rule("[bold]Serving the trained model with the KServe model server")
    served = serve_and_ask(run / "grpo" / "model", run / "curate" / "data", run_dir_p / "overlay.png")

    table = Table(title="DeepMedix demo — stages (tiny model, phantom CXRs)")
    for col in ("stage", "wall time (s)", "target metric", "before", "after"):
        table.add_column(col, justify="right" if col not in ("stage", "target metric") else "left")
    for r in rows:
        table.add_row(r["task"], f"{r.get('wall_s', 0):.1f}", r.get("metric", ""), _fmt(r.get("before")),
                      _fmt(r.get("after")))
    table.add_row("serve", f"{served['startup_s']:.1f}", "request latency (s)", "—", f"{served['latency_s']:.2f}")
    console.print(table)

    console.rule("[bold]Held-out test split, before and after each stage")
    held = Table(title="Test split: the model before the stage -> after it")
    held.add_column("stage")
    for _, title in HELD_OUT:
        held.add_column(title, justify="right")
    for stage, before, after in held_out(run, run_dir_p):
        held.add_row(stage, *(f"{_num(before.get(k))} -> {_num(after.get(k))}" for k, _ in HELD_OUT))
    console.print(held)
    ev = json.loads((run / "evaluate" / "results" / "metrics.json").read_text())["scores"]
    console.print("[bold]Evaluation on the test split:[/] " + ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items()))
    pred, rec = served["prediction"], served["record"]
    console.rule("[bold]Grounded answer from the served model")
    console.print(f"[bold]question:[/] {escape(rec.prompt)}")
    console.print(f"[bold]reference:[/] {escape(rec.answer)}   reference boxes (pixels): "
                  f"{escape(str([b.box for b in rec.boxes]))}")
    console.print(f"[bold]raw output:[/] {escape(pred['text'])}")
    console.print(f"[bold]answer:[/] {escape(str(pred['answer']))}   format ok: {pred['format_ok']}")
    for i, step in enumerate(pred["steps"], 1):
        console.print(f"  step {i}: {escape(step['text'])}  boxes (original pixels): {escape(str(step['boxes']))}")
    console.print(f"[bold]overlay PNG:[/] {run_dir_p / 'overlay.png'}")
    console.print(f"[bold]artifacts:[/] {run}")
    console.print(f"pipeline {pipeline_s:.1f} s, total {time.time() - t0:.1f} s")
