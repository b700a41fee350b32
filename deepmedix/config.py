"""One dataclass per stage, filled from ``configs/<stage>/<size>.yaml`` and overridden from the command line.

``load_config("sft", "tiny", ["max_steps=10"])`` reads ``configs/sft/tiny.yaml``; a path to a YAML file works too.
Unknown keys and values of the wrong type are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepmedix.errors import DeepMedixError, InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(DeepMedixError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class CurateConfig:
    """One source (``source`` + ``root`` + ``options``) or a mix (``sources``: a list of mappings with ``name``,
    ``root``, ``ratio``, ``limit``, ``options``). The phantom keys configure the embedded default source."""
    source: str = "phantom"
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    ratio: float = 1.0              # fraction of the source's records kept (seeded, per record id)
    limit: int = 0                  # at most this many records per source (0: all)
    sources: list[dict[str, Any]] = field(default_factory=list)
    # the phantom source
    n_patients: int = 40
    n_studies: int = 0              # > 0: draw this many studies instead of n_patients patients
    studies_per_patient: list[int] = field(default_factory=lambda: [1, 3])
    image_size: int = 512
    vqa_per_study: int = 3
    # images
    max_pixels: int = 512 * 512     # stored images are resized to at most this many pixels (boxes follow)
    max_image_pixels: int = 150_000_000  # larger inputs are quarantined as decompression bombs
    png_compress_level: int = 1
    # hygiene
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # seeded patient split
    dedupe_images: bool = True
    phash_distance: int = 8         # near-duplicate images: within this many of 256 hash bits (-1: exact only)
    dedupe_texts: bool = True
    scrub_phi: bool = True
    # scale
    workers: int = 2
    shard_size: int = 1000          # items per chunk (one Parquet shard per split per chunk)
    seed: int = 0


@dataclass
class ModelConfig:
    """The stage-1 starting point: the tiny Qwen2.5-VL built locally (same classes as the 7B, toy sizes), or with
    ``build: checkpoint`` a checkpoint the user supplies (the 7b recipe: Qwen2.5-VL-7B-Instruct)."""
    build: str = "tiny"             # tiny: build the tiny model unless a checkpoint is given; checkpoint: require one
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 4
    max_position_embeddings: int = 4096
    min_pixels: int = 168 * 168
    max_pixels: int = 168 * 168
    seed: int = 0


@dataclass
class TrainConfig:
    """Fields shared by the trainers (stage 1 SFT, stage 2 cold start, stage 3 GRPO)."""
    tasks: list[str] = field(default_factory=lambda: ["report_findings", "report_impression", "vqa", "grounding"])
    task_ratios: dict[str, float] = field(default_factory=dict)  # task -> fraction kept (1.0 = all)
    max_records: int = 0  # 0 = all
    max_steps: int = 100
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    max_length: int = 0  # tokens; longer samples are skipped and counted, never truncated (0 = no limit)
    min_pixels: int = 0  # 0 = the model folder's own pixel budget
    max_pixels: int = 0
    frame: str = "auto"  # box frame: native (each image's processor grid, Qwen2.5-VL's own) | squareN | auto (the
    #                      starting model's, as its lineage records it; native for a checkpoint that records none)
    dataloader_workers: int = 0  # processes decoding the images of the next batches (0 = the training process)
    bf16: bool = True       # bf16 on a CUDA GPU; on CPU training is always fp32
    gradient_checkpointing: bool = False
    freeze_vision: bool = False  # the vision tower (patch embedding and blocks) stays fixed
    freeze_merger: bool = False  # the vision-language merger stays fixed
    # LoRA (peft) on the language model instead of full fine-tuning; the saved model has the adapters merged
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    deepspeed: str = ""     # a DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json); "" = none
    save_steps: int = 0     # checkpoint to the store every N optimizer steps (0 = only the final model)
    save_total_limit: int = 2  # checkpoints kept in the store (older ones are deleted)
    checkpoint_uri: str = ""  # where checkpoints go; "" = "<out>-checkpoints" beside the output
    ddp_timeout_s: int = 14400  # collective timeout: other ranks wait while rank 0 uploads a checkpoint
    eval_records: int = 24  # held-out validate records for the stage's before/after metric
    eval_max_new_tokens: int = 96
    logging_steps: int = 10
    seed: int = 0


@dataclass
class SFTConfig(TrainConfig):
    pass


@dataclass
class ColdStartConfig(TrainConfig):
    teacher: str = "template"       # "template" (offline, from the record) or "openai" (an OpenAI-compatible chat API)
    tasks: list[str] = field(default_factory=lambda: ["report_impression", "vqa", "grounding"])
    # the openai teacher
    teacher_base_url: str = ""      # "" = the env var OPENAI_BASE_URL
    teacher_model: str = ""
    teacher_api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var that holds the key (never the key itself)
    teacher_concurrency: int = 4    # requests in flight
    teacher_max_retries: int = 4    # retries per request on timeouts, connection errors, 429 and 5xx
    teacher_timeout_s: float = 60.0
    teacher_backoff_s: float = 1.0  # first retry delay; doubles per retry, with jitter
    teacher_temperature: float = 0.2
    teacher_max_tokens: int = 1024
    teacher_cache: str = ""         # response cache folder; "" = $DEEPMEDIX_CACHE/teacher (~/.cache/deepmedix/teacher)
    # how many traces: synthesis stops once max_kept train traces passed the filter (0 = every selected record),
    # asking the teacher synth_chunk records at a time
    max_kept: int = 0
    synth_chunk: int = 256
    # the trace filter
    filter_iou: float = 0.1         # with reference boxes: every cited box overlaps one of them at least this much
    filter_answer_min: float = 0.9  # long (report) answers: reward accuracy >= this fraction of its maximum
    min_trace_chars: int = 20
    max_trace_chars: int = 4000


@dataclass
class GRPOConfig(TrainConfig):
    tasks: list[str] = field(default_factory=lambda: ["vqa", "grounding"])
    learning_rate: float = 5e-5
    # rollouts
    num_generations: int = 4        # completions per prompt (the GRPO group)
    max_prompt_length: int = 0      # tokens, images included; longer prompts are skipped and counted (0 = no limit)
    max_completion_length: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    use_vllm: str = "auto"          # "auto": vLLM (TRL colocate mode) when it is installed and a GPU is there
    vllm_gpu_memory_utilization: float = 0.5
    # the objective (TRL names)
    beta: float = 0.0               # KL coefficient (TRL's k3 low-variance estimator, in the loss); 0 = no KL
    epsilon: float = 0.2            # clip range, low side
    epsilon_high: float = 0.0       # clip range, high side (0 = epsilon)
    loss_type: str = "dapo"         # token-level mean over the batch (EasyR1's token-mean)
    scale_rewards: str = "group"    # GRPO advantages: (r - group mean) / group std
    num_iterations: int = 1         # policy updates per generation batch
    steps_per_generation: int = 0   # micro-batches per generation batch (0 = gradient_accumulation_steps: one
                                    # update per generation; k x that = k updates, EasyR1's rollout batch)
    delta: float = 0.0              # dual-clip bound on the ratio (EasyR1 clip_ratio_dual; 0 = off)
    max_grad_norm: float = 1.0
    # the reward: a name (paper, paper-words, grounded, clinical), a composite under configs/rewards/, a YAML
    # file, or inline weights (paper=1,grounded=0.5); reward_weights, when given, wins over it
    reward: str = "paper"
    reward_weights: dict[str, float] = field(default_factory=dict)
    grounded_mode: str = "soft"     # soft: iou_weight * mean matched IoU + count_weight * count agreement; gemex: 0/1
    grounded_iou_weight: float = 0.5
    grounded_count_weight: float = 0.5
    grounded_gemex_iou: float = 0.75
    clinical_uncertain: str = "positive"  # uncertain CheXpert mentions: positive, negative or ignore
    # inspection
    rollout_samples: int = 4        # completions per step written to rollouts.jsonl with their rewards (0 = none)


@dataclass
class EvalConfig:
    split: str = "test"
    tasks: list[str] = field(default_factory=lambda: ["report_findings", "report_impression", "vqa", "grounding"])
    max_records: int = 0
    batch_size: int = 16
    max_new_tokens: int = 160
    min_pixels: int = 0
    max_pixels: int = 0
    frame: str = "auto"  # as the model was trained: auto (its lineage's, else native) | native | squareN
    #                      (deepmedix eval frame-calibrate tells for a checkpoint that records none)
    prompt: str = "auto"  # reasoning: the task + the reasoning instruction, answers read from \\boxed{} (the paper's);
    #                      plain: the task alone, the whole output is the answer (how stage-1 SFT trains);
    #                      auto: plain for a stage-1 (sft) model folder, else reasoning
    bootstrap_rounds: int = 1000    # resamples for the 95 % intervals (0 = none)
    meteor: bool = True             # METEOR 1.5 (pycocoevalcap's jar; needs Java)
    chexpert_uncertain: str = "positive"  # uncertain CheXpert mentions: positive, negative or ignore
    # metrics with a model the user supplies (local paths; never downloaded); empty = not computed
    bertscore_model: str = ""       # a Hugging Face model folder (e.g. roberta-large)
    bertscore_layers: int = 0       # 0 = bert-score's layer for the model's name, else the last layer
    bertscore_idf: bool = False
    chexbert_checkpoint: str = ""   # CheXbert's chexbert.pth
    chexbert_tokenizer: str = ""    # a bert-base-uncased tokenizer folder (CheXbert's tokenizer)
    radgraph_model: str = ""        # RadGraph's radgraph.tar.gz (or radgraph-xl.tar.gz), or the extracted folder
    radgraph_encoder: str = ""      # local folder of the BERT the RadGraph config names ("" = the local HF cache)
    radgraph_type: str = "radgraph"  # radgraph or radgraph-xl
    seed: int = 0


@dataclass
class ArenaConfig:
    """The Report Arena (:mod:`deepmedix.eval.arena`): LLM judges compare models' answers pairwise."""
    # each judge: model, base_url ("" = the env var OPENAI_BASE_URL), api_key_env (the NAME of the env var that
    # holds the key; default OPENAI_API_KEY), name (how reports call it; default: the model)
    judges: list[dict[str, str]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["report_findings", "report_impression"])
    max_records: int = 0            # records judged: a seeded sample of those every model answered (0 = all)
    include_reasoning: bool = False  # show the judge each answer's <think> reasoning, not only the boxed answer
    concurrency: int = 4            # judge requests in flight, all judges together
    max_retries: int = 4            # HTTP retries per request on timeouts, connection errors, 429 and 5xx
    malformed_retries: int = 2      # re-asks after a reply that is not a valid verdict; then the judgment fails
    timeout_s: float = 60.0
    backoff_s: float = 1.0          # first retry delay; doubles per retry, with jitter (Retry-After honoured)
    temperature: float = 0.0
    max_tokens: int = 512
    cache: str = ""                 # judge reply cache folder; "" = $DEEPMEDIX_CACHE/arena (~/.cache/deepmedix/arena)
    bootstrap_rounds: int = 1000    # resamples of the records for the 95 % intervals (0 = none)
    prior_ties: float = 1.0         # virtual ties between every model pair: finite ratings when one model always wins
    elo_scale: float = 400.0        # rating points per factor 10 in the odds of winning
    elo_anchor: float = 1000.0      # the mean rating, or anchor_model's
    anchor_model: str = ""
    seed: int = 0


STAGES: dict[str, type] = {
    "curate": CurateConfig,
    "model": ModelConfig,
    "sft": SFTConfig,
    "coldstart": ColdStartConfig,
    "grpo": GRPOConfig,
    "eval": EvalConfig,
    "arena": ArenaConfig,
}


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):  # YAML reads true/false as booleans (e.g. use_vllm: true)
        return "true" if value else "false"
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    return value


FRAME_RE = re.compile(r"auto|native|square[1-9][0-9]*")


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    if isinstance(data.get("frame"), int) and not isinstance(data["frame"], bool):
        data = {**data, "frame": f"square{data['frame']}"}  # the old setting: the side of the square
    kwargs = {k: _check_type(v, hints[k], f"{source}: key '{k}'") for k, v in data.items()}
    if "frame" in kwargs and not FRAME_RE.fullmatch(kwargs["frame"].strip().lower()):
        raise ConfigError(f"{source}: key 'frame': expected 'auto', 'native' or 'squareN' (e.g. square512), got "
                          f"{kwargs['frame']!r}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value of '{key.strip()}' is not valid YAML ({exc})") from exc
    return out


def config_path(stage: str, size_or_path: str) -> Path:
    p = Path(size_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return CONFIG_DIR / stage / f"{size_or_path}.yaml"


def read_mapping(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: ``{}``); an unreadable file, bad YAML or another top level
    is an InputError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level of the {what}")
    return data


def load_config(stage: str, size_or_path: str = "tiny", overrides: list[str] | None = None) -> Any:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known: {sorted(STAGES)}")
    path = config_path(stage, size_or_path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found for stage '{stage}'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data.update(parse_overrides(overrides))
    return from_dict(STAGES[stage], data, str(path))


def load_size(size: str) -> dict[str, Any]:
    """Every stage's config for one size (``configs/<stage>/<size>.yaml``): what a pipeline run with ``size`` will
    load, resolved now. A stage without a file, or a file that does not load, is a ConfigError naming it."""
    if Path(size).suffix in (".yaml", ".yml"):
        raise ConfigError(f"size {size!r}: a size names configs/<stage>/<size>.yaml for every stage, not one file")
    out, missing = {}, []
    for stage in STAGES:
        if not config_path(stage, size).exists():
            missing.append(str(config_path(stage, size).relative_to(CONFIG_DIR.parent)))
            continue
        out[stage] = load_config(stage, size)
    if missing:
        raise ConfigError(f"size {size!r}: no config for {', '.join(missing)}")
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
