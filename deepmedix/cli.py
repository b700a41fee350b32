"""``deepmedix …``: every stage from the command line, the pipeline, serving and the demo."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deepmedix.errors import InputError

app = typer.Typer(help="DeepMedix-R1: grounded chest X-ray reasoning — curate, train, evaluate, serve.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: the phantom CXR generator and curation.", no_args_is_help=True)
model_app = typer.Typer(help="Model folders.", no_args_is_help=True)
train_app = typer.Typer(help="Stage 1 SFT, stage 2 cold start, stage 3 GRPO.", no_args_is_help=True)
coldstart_app = typer.Typer(help="Cold-start trace synthesis.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluation.", no_args_is_help=True)
pipeline_app = typer.Typer(help="The KFP pipeline.", no_args_is_help=True)
reward_app = typer.Typer(help="GRPO rewards.", no_args_is_help=True)
reader_app = typer.Typer(help="The expert reader study: create, serve, export.", no_args_is_help=True)
arena_app = typer.Typer(help="The Report Arena: judge LLMs compare models' answers.", no_args_is_help=True)
stage_app = typer.Typer(help="Run a stage as a pipeline step does (multi-node: a Kubeflow Trainer TrainJob).",
                        no_args_is_help=True)
for sub, name in ((data_app, "data"), (model_app, "model"), (train_app, "train"), (coldstart_app, "coldstart"),
                  (eval_app, "eval"), (pipeline_app, "pipeline"), (reward_app, "reward"),
                  (reader_app, "reader"), (arena_app, "arena"), (stage_app, "stage")):
    app.add_typer(sub, name=name)

err = Console(stderr=True)
CONFIG = typer.Option("tiny", "--config", "-c", help="config size (configs/<stage>/<size>.yaml) or a YAML path")
SET = typer.Option(None, "--set", "-s", help="override a config key: KEY=VALUE (repeatable)")
RESUME = typer.Option(False, "--resume", help="continue from the newest checkpoint in the store (see save_steps)")


@contextmanager
def cli_errors() -> Iterator[None]:
    """The library's own errors (:class:`deepmedix.errors.DeepMedixError`: bad input, a missing file, a store, model,
    curation or cluster failure) become one clear line on stderr and exit code 2; anything else is a bug and raises
    with its traceback."""
    from deepmedix.errors import DeepMedixError

    try:
        yield
    except DeepMedixError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def progress_bar(label: str):
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=False) as p:
        task = p.add_task(label, total=None)
        yield lambda done, total: p.update(task, completed=done, total=total or None)


def show(result: dict) -> None:
    print(json.dumps(result, indent=2, default=str))


@data_app.command("phantom")
def data_phantom(out: str = typer.Option(..., help="output dataset folder or s3:// URI"),
                 n: int = typer.Option(0, "--n", help="number of studies to draw (0: the config's n_patients)"),
                 workers: Optional[int] = typer.Option(None, help="image worker processes"),
                 config: str = CONFIG, set_: Optional[List[str]] = SET):
    """Generate the phantom CXR set, streamed through curation (Records as Parquet + PNG, split by patient)."""
    from deepmedix import stages

    extra = [f"n_studies={n}"] if n else []
    extra += [f"workers={workers}"] if workers else []
    with cli_errors(), progress_bar("phantom records") as prog:
        show(stages.curate(out, config, list(set_ or []) + extra, progress=prog, log=_log))


def _log(line: str) -> None:
    err.print(line, soft_wrap=True, highlight=False, markup=False)


@data_app.command("card")
def data_card(dataset: str = typer.Argument(..., help="a curated dataset folder or s3:// URI"),
              out: str = typer.Option(..., help="folder (or s3:// URI) for card.md and its PNGs"),
              sample: int = typer.Option(6, help="records per task on the contact sheets"),
              seed: int = typer.Option(0, help="which records the contact sheets show")):
    """A dataset card: card.md with PNGs (records by source/task/split, VQA types, box positions and sizes per
    label, quarantine reasons, near-duplicate pairs, sample records with their boxes)."""
    from deepmedix.data.card import write_card

    with cli_errors():
        show(write_card(dataset, out, sample, seed))


@app.command("curate")
def curate(out: str = typer.Option(..., help="output dataset folder or s3:// URI"),
           source: str = typer.Option("", help="one source adapter, e.g. mimic_cxr, iu_xray, vindr_cxr"),
           root: str = typer.Option("", help="the source dataset as published: a folder or s3:// prefix"),
           limit: Optional[int] = typer.Option(None, help="at most N records per source"),
           workers: Optional[int] = typer.Option(None, help="image worker processes"),
           config: str = typer.Option("tiny", "--config", "-c",
                                      help="config size (configs/curate/<size>.yaml) or a YAML path "
                                           "(a mix of sources)"),
           card: bool = typer.Option(True, "--card/--no-card",
                                     help="then write the dataset card (card.md + PNGs) into OUT/card"),
           set_: Optional[List[str]] = SET):
    """Curate public CXR datasets (or a mix from --config) into one Record dataset; bad inputs are quarantined.
    The dataset card is written into OUT/card (``deepmedix data card`` writes one anywhere)."""
    import json as _json

    from deepmedix import stages

    extra = list(set_ or [])
    if root and not source:
        err.print("[bold red]error:[/] --root needs --source (which adapter reads it)", highlight=False)
        raise typer.Exit(2)
    if source:
        extra += [f"source={source}", f"root={_json.dumps(root)}", "sources=[]"]
    if limit is not None:
        extra.append(f"limit={limit}")
    if workers is not None:
        extra.append(f"workers={workers}")
    with cli_errors(), progress_bar("records") as prog:
        result = stages.curate(out, config, extra, progress=prog, log=_log)
    if card:
        with cli_errors():
            result["card"] = stages.dataset_card(out, log=_log)
    show(result)


@model_app.command("tiny")
def model_tiny(out: str = typer.Option(..., help="output model folder or s3:// URI"),
               data: str = typer.Option("", help="a dataset whose train text the tokenizer learns"),
               config: str = CONFIG, set_: Optional[List[str]] = SET):
    """Build the tiny Qwen2.5-VL (random init, tokenizer trained here)."""
    from deepmedix import stages, store
    from deepmedix.config import ConfigError, load_config
    from deepmedix.model.tiny import build_tiny

    with cli_errors():
        if data:
            show(stages.base_model(data, out, config, set_))
        else:
            cfg = load_config("model", config, set_)
            if cfg.build != "tiny":
                raise ConfigError(f"model config {config!r}: build: {cfg.build} starts from a checkpoint you supply "
                                  f"(the pipeline's base_model_uri); `model tiny` builds the tiny model only")
            with store.atomic_dir(out) as folder:
                build_tiny(folder, cfg)
                store.write_lineage(folder, "base_model", cfg)
            show({"stage": "base_model", "out": out})


@train_app.command("sft")
def train_sft(data: str = typer.Option(...), model: str = typer.Option(...), out: str = typer.Option(...),
              config: str = CONFIG, set_: Optional[List[str]] = SET, resume: bool = RESUME):
    """Stage 1: instruction SFT (TRL SFTTrainer)."""
    from deepmedix import stages

    with cli_errors():
        show(stages.sft(data, model, out, config, set_, resume=resume))


@train_app.command("coldstart")
def train_coldstart(traces: str = typer.Option(...), model: str = typer.Option(...), out: str = typer.Option(...),
                    config: str = CONFIG, set_: Optional[List[str]] = SET, resume: bool = RESUME):
    """Stage 2: SFT on grounded reasoning traces."""
    from deepmedix import stages

    with cli_errors():
        show(stages.coldstart_sft(traces, model, out, config, set_, resume=resume))


@train_app.command("grpo")
def train_grpo(data: str = typer.Option(...), model: str = typer.Option(...), out: str = typer.Option(...),
               config: str = CONFIG, set_: Optional[List[str]] = SET, resume: bool = RESUME):
    """Stage 3: GRPO with rule-based rewards (TRL GRPOTrainer)."""
    from deepmedix import stages

    with cli_errors():
        show(stages.grpo(data, model, out, config, set_, resume=resume))


@reward_app.command("score")
def reward_score(file: str = typer.Argument(..., help="JSONL: one object a line with prediction, ground_truth "
                                                    "(and boxes [[x1, y1, x2, y2], ...] in the model frame, task)"),
                 reward: str = typer.Option("paper", "--reward", "-r",
                                            help="paper, paper-words, grounded, clinical, a composite under "
                                                 "configs/rewards/, a YAML file, or inline weights "
                                                 "paper=1,grounded=0.5")):
    """Score predictions with a reward: one JSON object a line, with every component and overall."""
    import json
    from pathlib import Path

    from deepmedix.rewards.spec import RewardSpec, read_score_rows, score_rows

    with cli_errors():
        spec = RewardSpec.parse(reward)
        rows = read_score_rows(Path(file))  # every line checked before any is printed
        for scores in score_rows(spec, rows):
            print(json.dumps(scores), flush=True)


@coldstart_app.command("synth")
def coldstart_synth(data: str = typer.Option(...), out: str = typer.Option(...), config: str = CONFIG,
                    set_: Optional[List[str]] = SET):
    """Write grounded traces for the selected records with a teacher, filtered."""
    from deepmedix import stages

    with cli_errors():
        show(stages.coldstart_synth(data, out, config, set_))


@eval_app.command("run")
def eval_run(model: str = typer.Option(...), data: str = typer.Option(...), out: str = typer.Option(...),
             split: str = typer.Option("", help="split to evaluate (default: the config's)"), config: str = CONFIG,
             set_: Optional[List[str]] = SET):
    """Generate on a split, write predictions JSONL, metrics JSON and a markdown table."""
    from deepmedix import stages

    overrides = list(set_ or []) + ([f"split={split}"] if split else [])
    with cli_errors(), progress_bar("generating") as prog:
        show(stages.evaluate(data, model, out, config, overrides, progress=prog))


@eval_app.command("frame-calibrate")
def eval_frame_calibrate(model: str = typer.Option(..., help="model folder or s3:// URI (e.g. the released one)"),
                         data: str = typer.Option(..., help="a curated dataset with labelled boxes"),
                         split: str = typer.Option("test"),
                         max_records: int = typer.Option(64, help="records with boxes to score (0: all)"),
                         frames: str = typer.Option("native,square512", help="the conventions to compare"),
                         max_new_tokens: int = typer.Option(1024), batch_size: int = typer.Option(8),
                         out: str = typer.Option("", help="also write the report to this JSON file")):
    """Which box frame a checkpoint writes in: its boxes on labelled records, read under each convention."""
    from deepmedix.eval.calibrate import frame_calibrate

    with cli_errors(), progress_bar("generating") as prog:
        rep = frame_calibrate(model, data, out, split, max_records, batch_size, max_new_tokens,
                              tuple(f.strip() for f in frames.split(",") if f.strip()), progress=prog)
        show(rep)
        typer.echo(f"best fit: frame {rep['best']} (mIoU lead {rep['lead_miou']:+.3f} over {rep['records']} "
                   f"records); use it as the eval config's frame and the server's --frame", err=True)


def _model_files(items: list[str], what: str) -> dict[str, str]:
    """NAME=PATH pairs (repeatable options) as a dict; a bad item is a clear error."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"{what}: expected NAME=PATH, got {item!r}")
        if name.strip() in out:
            raise InputError(f"{what}: model {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    return out


@arena_app.command("run")
def arena_run(predictions: List[str] = typer.Option(..., "--predictions", "-p",
                                                   help="NAME=PATH: a model's predictions.jsonl or evaluation folder "
                                                        "(repeat: 2 or more models)"),
              out: str = typer.Option(..., help="output folder or s3:// URI"), config: str = CONFIG,
              set_: Optional[List[str]] = SET):
    """Judges compare every pair of models on the same records (both orders); Bradley-Terry ratings with 95 % CIs,
    win rates, leaderboard.md and leaderboard.png."""
    from deepmedix.config import load_config
    from deepmedix.eval.arena import run_arena

    with cli_errors(), progress_bar("judgments") as prog:
        show(run_arena(load_config("arena", config, set_), _model_files(predictions, "--predictions"), out,
                       progress=prog))


@reader_app.command("create")
def reader_create(db: str = typer.Option(..., help="the study file to create (SQLite; must not exist)"),
                  data: str = typer.Option(..., help="the curated dataset the predictions were made on"),
                  predictions: List[str] = typer.Option(..., "--predictions", "-p",
                                                        help="NAME=predictions.jsonl of one model (repeat: 2 or more)"),
                  reader: List[str] = typer.Option(..., "--reader", "-r", help="a reader's name (repeatable)"),
                  cases: int = typer.Option(30, help="cases in the study"), seed: int = 0):
    """Create a blinded study; prints each reader's personal sign-in token (only its hash is stored)."""
    from deepmedix.reader import create_study

    with cli_errors():
        tokens = create_study(db, data, _model_files(predictions, "--predictions"), list(reader), cases, seed)
        show({"study": db, "tokens": tokens})


@reader_app.command("serve")
def reader_serve(db: str = typer.Option(...), port: int = 8000, host: str = "127.0.0.1",
                 secure_cookie: bool = typer.Option(False, help="mark the session cookie Secure (behind HTTPS)")):
    """Serve the study to its readers (FastAPI)."""
    from deepmedix.reader import serve as run

    with cli_errors():
        run(db, host=host, port=port, secure_cookie=secure_cookie)


@reader_app.command("export")
def reader_export(db: str = typer.Option(...), out: str = typer.Option(..., help="output folder")):
    """Per model: per-axis means and preference shares, as CSV, markdown and PNG."""
    from deepmedix.reader import export

    with cli_errors():
        show(export(db, out))


@eval_app.command("reports")
def eval_reports(pairs: str = typer.Argument(..., help='JSONL: {"id", "prediction", "reference"} a line'),
                 json_: bool = typer.Option(False, "--json", help="print one JSON object"),
                 meteor: bool = typer.Option(True, help="METEOR 1.5 (pycocoevalcap's jar; needs Java)")):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of report pairs, as pycocoevalcap computes them (after tokenising)."""
    import json

    from deepmedix.eval.nlg import score_pairs_file

    with cli_errors():
        scores = score_pairs_file(pairs, meteor=meteor)
        if json_:
            print(json.dumps(scores))
        else:
            show(scores)


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context, model: str = typer.Option(..., help="model folder or s3:// URI"), port: int = 8080,
          host: str = "127.0.0.1", name: str = "deepmedix"):
    """Serve a model with the KServe model server: v1, v2 and OpenAI-compatible routes, grounded answers.

    Further options go to the server as they are (see `python -m serving.server --help`): --max-batch-size,
    --max-wait-ms, --max-queue, --request-timeout-s, --max-new-tokens, --max-image-bytes, --max-pixels,
    --api-token-file, ..."""
    from serving.server import main

    with cli_errors():
        main(["--model", model, "--port", str(port), "--host", host, "--name", name, *ctx.args])


@pipeline_app.command("compile")
def pipeline_compile(out: str = typer.Option("pipelines/deepmedix_pipeline.yaml"),
                     size: str = typer.Option("", help="resolve every stage's configs/<stage>/SIZE.yaml now and "
                                                       "make SIZE the pipeline's default size (e.g. 7b)")):
    """Write the pipeline IR YAML."""
    from pipelines.compile import compile_pipeline

    with cli_errors():
        print(compile_pipeline(out, size))


@pipeline_app.command("submit")
def pipeline_submit(host: str = typer.Option(..., help="the KFP API, e.g. http://ml-pipeline-ui.kubeflow or "
                                                       "https://<kubeflow>/pipeline"),
                    params: str = typer.Option("", help="a YAML file of pipeline parameters (see pipelines/README)"),
                    experiment: str = typer.Option("deepmedix", help="the KFP experiment"),
                    run_name: str = typer.Option("", help="default: deepmedix-r1-<time>"),
                    namespace: str = typer.Option("", help="the KFP namespace (multi-user Kubeflow)"),
                    pipeline_root: str = typer.Option("", help="s3://... for this run (default: the namespace's "
                                                               "kfp-launcher defaultPipelineRoot)"),
                    token_env: str = typer.Option("KF_PIPELINES_TOKEN",
                                                  help="the NAME of an env var holding a bearer token, if needed")):
    """Compile the pipeline and create a run through kfp.Client; prints the run id and its URL."""
    import os

    from pipelines.submit import load_params, submit

    with cli_errors():
        show(submit(host, load_params(params) if params else {}, experiment, run_name, namespace,
                    os.environ.get(token_env) or None, pipeline_root))


@pipeline_app.command("run-local")
def pipeline_run_local(root: str = typer.Option("runs/local/pipeline_root"), size: str = "tiny"):
    """Run the whole pipeline under kfp.local (subprocess runner)."""
    from pathlib import Path

    from pipelines.demo import run_pipeline_local, stage_metrics

    with cli_errors():
        run = run_pipeline_local(Path(root).resolve(), size=size)
        show({"run": str(run), "stages": stage_metrics(run)})


@app.command("rehearse")
def rehearse(size: str = typer.Option("7b", help="the configs: configs/<stage>/SIZE.yaml for every stage"),
             gpus: int = typer.Option(8, help="GPUs each training stage runs on (nodes x GPUs per node)"),
             records: int = typer.Option(100_000, help="records of the large synthetic dataset"),
             small: int = typer.Option(10_000, help="records of the small synthetic dataset"),
             as_json: bool = typer.Option(False, "--json", help="one JSON object instead of the tables")):
    """Before any GPU: load every stage's config for SIZE, build Qwen2.5-VL-7B on the meta device and plan each
    training stage's memory per GPU, and run the training data path over SMALL and RECORDS synthetic records;
    exit 1 when a stage does not fit 80 GB or the data path's peak memory grows more than 15 %."""
    import contextlib

    from rich.table import Table

    from deepmedix.config import load_size
    from deepmedix.model.shapes import QWEN25_VL_7B, meta_model
    from deepmedix.train.plan import GPU_GB, RSS_RATIO_MAX, Shape, plan
    from deepmedix.train.rehearse_data import rss

    with cli_errors(), contextlib.redirect_stdout(sys.stderr):  # stdout: the result only (libraries log there)
        configs = load_size(size)
        shape = Shape.of(meta_model(QWEN25_VL_7B))
        memory = plan(configs, shape, {stage: gpus for stage in ("sft", "coldstart", "grpo")})
        data = rss(small, records)
    ok = all(m["fits"] for m in memory.values()) and data["rss_ratio"] <= RSS_RATIO_MAX
    if as_json:
        print(json.dumps({"size": size, "configs_ok": True, "model_params": shape.params, "gpu_gb": GPU_GB,
                          "memory_plan": memory, **data, "ok": ok}, indent=2))
    else:
        terms = ["weights", "gradients", "optimizer", "activations", "reference", "rollouts", "runtime", "total"]
        table = Table(title=f"size {size}: every stage's config loads; Qwen2.5-VL-7B ({shape.params / 1e9:.2f}B "
                            f"parameters), GB per GPU of {GPU_GB:g}")
        for col in ["stage", "GPUs", "ZeRO", "batch x tokens", *terms, "fits"]:
            table.add_column(col, no_wrap=True)
        for stage, m in memory.items():
            table.add_row(stage, str(m["gpus"]), str(m["zero"]), f"{m['micro_batch']} x {m['seq_len']}",
                          *[f"{m[t]:.1f}" if t in m else "—" for t in terms], "yes" if m["fits"] else "NO")
        console = Console(width=160)
        console.print(table)
        console.print(f"data path (SFT's, synthetic records): peak RSS {data['rss_mb_small']:.0f} MB over "
                      f"{data['records_small']} records, {data['rss_mb_large']:.0f} MB over {data['records_large']}: "
                      f"ratio {data['rss_ratio']:.3f} (at most {RSS_RATIO_MAX})")
    raise typer.Exit(0 if ok else 1)


@app.command("demo")
def demo(run_dir: str = typer.Option("runs/demo")):
    """The pipeline under kfp.local, then serving and one grounded answer."""
    from pipelines.demo import main

    with cli_errors():
        main(run_dir)


from deepmedix.cluster.commands import register as _register_cluster  # noqa: E402 - needs the helpers above

_register_cluster(app, stage_app, cli_errors, show)

if __name__ == "__main__":
    sys.exit(app())
