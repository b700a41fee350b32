"""Report metrics that need a model the user supplies as a local folder or file (nothing is downloaded).

* **BERTScore** (``eval.bertscore_model``: a Hugging Face model folder, e.g. ``roberta-large`` or a radiology BERT
  saved with ``save_pretrained``): computed by the ``bert-score`` package itself (``bert_score.score``) with that
  folder as ``model_type``; per-pair precision, recall and F1. Layer: ``eval.bertscore_layers``, or bert-score's
  own choice for the model's name where it has one (``model2layers``), else the last layer. ``eval.bertscore_idf``
  weights tokens by their inverse document frequency over the references, as bert-score does.
* **CheXbert** (``eval.chexbert_checkpoint``: the ``chexbert.pth`` released with CheXbert, plus
  ``eval.chexbert_tokenizer``: a ``bert-base-uncased`` folder with its tokenizer files and ``config.json``): the 14
  observations labelled by the model (:class:`CheXbert`), scored as the rule-based labeller's labels are: uncertain
  counts as positive by default (``eval.chexpert_uncertain``; f1chexbert's "rrg" mode does the same), micro F1 over
  the observations' pooled counts, macro F1 over the observations with reference support (f1chexbert's sklearn
  report averages over all 14, counting a column with no reference and no predicted positive as 0; on a test set
  where every observation occurs the two agree).
* **RadGraph F1** (``eval.radgraph_model``: the released RadGraph archive or its extracted folder, plus optionally
  ``eval.radgraph_encoder``: a local folder of the BERT its config names): the ``simple``, ``partial`` and
  ``complete`` rewards of the ``radgraph`` package per pair (:mod:`deepmedix.eval.radgraph`).

Without a configured path these metrics are not computed, and :func:`notes` says so (the evaluation writes the
notes to ``metrics.json`` and ``metrics.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepmedix import clinical
from deepmedix.errors import DeepMedixError, InputError


class ModelMetricError(DeepMedixError, ValueError):
    """A configured model path is missing or not a usable model; the message names the setting and the path."""


def _offline():
    """No hub access while a user's local model loads (environment and huggingface_hub's own flag): a missing
    file fails instead of downloading."""
    from deepmedix.eval.radgraph import _offline as offline

    return offline()


def _folder(setting: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelMetricError(f"{setting}: {path!r} is not a folder (give a local model folder, as written by "
                               "save_pretrained; models are never downloaded)")
    if not (p / "config.json").is_file():
        raise ModelMetricError(f"{setting}: {path!r} has no config.json (not a Hugging Face model folder)")
    return p


def bertscore_layer(path: str | Path, layers: int = 0) -> int:
    """The hidden layer BERTScore uses: ``layers`` when > 0; else bert-score's table entry for the folder's name
    (e.g. ``roberta-large`` 17, ``bert-base-uncased`` 9) or the config's ``_name_or_path``; else the last layer."""
    import json

    from bert_score.utils import model2layers

    folder = Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    total = int(cfg.get("num_hidden_layers") or cfg.get("n_layers") or cfg.get("num_layers") or 0)
    if layers > 0:
        if total and layers > total:
            raise ModelMetricError(f"eval.bertscore_layers: {layers} > the model's {total} layers ({folder})")
        return layers
    for name in (folder.name, str(cfg.get("_name_or_path") or "")):
        for key in (name, name.split("/")[-1]):
            if key in model2layers and (not total or model2layers[key] <= total):
                return int(model2layers[key])
    if not total:
        raise ModelMetricError(f"eval.bertscore_layers: cannot tell the layer count of {folder}; set it")
    return total


def bertscore(predictions: list[str], references: list[str], model: str, *, layers: int = 0, idf: bool = False,
              batch_size: int = 64, device: str | None = None) -> dict[str, np.ndarray]:
    """Per-pair BERTScore ``{"precision", "recall", "f1"}`` (float arrays) with the local model folder ``model``."""
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions but {len(references)} references")
    folder = _folder("eval.bertscore_model", model)
    layer = bertscore_layer(folder, layers)
    if not predictions:
        empty = np.zeros(0)
        return {"precision": empty, "recall": empty, "f1": empty}
    import math
    from collections import Counter, defaultdict

    import torch
    from bert_score import score
    from bert_score.utils import get_tokenizer, sent_encode

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # bert-score gives an empty side P = R = F = 0; its own encoding of "" fails with transformers 5, so empty
    # pairs are scored here and the idf table (over all references, as bert-score builds it) is made here too
    keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    out = {k: np.zeros(len(predictions)) for k in ("precision", "recall", "f1")}
    if not keep:
        return out
    with _offline():
        try:
            weights: bool | dict = False
            if idf:
                tok = get_tokenizer(str(folder), False)
                docs = Counter(t for r in references if r.strip() for t in set(sent_encode(tok, r)))
                n = len(references)
                weights = defaultdict(lambda: math.log(n + 1))
                weights.update({t: math.log((n + 1) / (c + 1)) for t, c in docs.items()})
                weights[tok.sep_token_id] = weights[tok.cls_token_id] = 0.0  # in every reference, empty ones too
            p, r, f = score([predictions[i] for i in keep], [references[i] for i in keep], model_type=str(folder),
                            num_layers=layer, idf=weights, batch_size=batch_size, device=device, verbose=False)
        except OSError as e:  # a folder without weights or tokenizer files
            raise ModelMetricError(f"eval.bertscore_model: cannot load {folder}: {e}") from e
    for key, v in (("precision", p), ("recall", r), ("f1", f)):
        out[key][keep] = v.numpy().astype(np.float64)
    return out


# CheXbert's label order (its src/constants.py CONDITIONS) and its heads' classes: 13 heads of 4 classes
# (0 blank, 1 positive, 2 negative, 3 uncertain), then "No Finding" with 2 (0 blank, 1 positive)
CHEXBERT_CONDITIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                       "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                       "Fracture", "Support Devices", "No Finding")
CHEXBERT_CLASSES = {0: None, 1: clinical.POS, 2: clinical.NEG, 3: clinical.UNC}
CHEXBERT_MAX_TOKENS = 512


class CheXbert:
    """CheXbert's labeller (``bert_labeler``: a BERT encoder, dropout, then one linear head per condition on the
    last layer's [CLS] vector; argmax per head) loaded from the released checkpoint (a dict with
    ``model_state_dict``, keys ``module.bert.*`` and ``module.linear_heads.{0..13}.*``; a bare state dict and keys
    without ``module.`` load too). The encoder's shape comes from ``config.json`` in the tokenizer folder (the
    ``bert-base-uncased`` folder has one), else from the checkpoint's tensor shapes. Texts are cleaned as CheXbert
    does (newlines to spaces, whitespace collapsed), tokenised with [CLS]/[SEP] and cut to 512 tokens (the last
    kept one [SEP])."""

    def __init__(self, checkpoint: str, tokenizer: str, device: str | None = None, batch_size: int = 32) -> None:
        import torch

        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise ModelMetricError(f"eval.chexbert_checkpoint: {checkpoint!r} is not a file (give CheXbert's "
                                   "chexbert.pth; models are never downloaded)")
        if not tokenizer:
            raise ModelMetricError("eval.chexbert_tokenizer: not set (give a bert-base-uncased folder with its "
                                   "tokenizer files and config.json)")
        tok_dir = Path(tokenizer).expanduser()
        if not tok_dir.is_dir():
            raise ModelMetricError(f"eval.chexbert_tokenizer: {tokenizer!r} is not a folder")
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file
            raise ModelMetricError(f"eval.chexbert_checkpoint: cannot read {ckpt}: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
            state = state["model_state_dict"]
        if not isinstance(state, dict) or not state:
            raise ModelMetricError(f"eval.chexbert_checkpoint: {ckpt} holds no state dict")
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
        self.heads = []
        for i, cond in enumerate(CHEXBERT_CONDITIONS):
            w, b = state.get(f"linear_heads.{i}.weight"), state.get(f"linear_heads.{i}.bias")
            want = 2 if cond == "No Finding" else 4
            if w is None or b is None or w.ndim != 2 or w.shape[0] != want or b.shape != (want,):
                raise ModelMetricError(f"eval.chexbert_checkpoint: {ckpt}: 'module.linear_heads.{i}' ({cond}) is "
                                       f"missing or not a {want}-class head; not a CheXbert checkpoint")
            self.heads.append((w.float(), b.float()))
        bert_state = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
        bert_state.pop("embeddings.position_ids", None)  # a buffer older transformers saved; not a weight now
        if "embeddings.word_embeddings.weight" not in bert_state:
            raise ModelMetricError(f"eval.chexbert_checkpoint: {ckpt} has no 'module.bert.embeddings' weights")
        from transformers import AutoTokenizer, BertModel

        config = self._config(tok_dir, bert_state)
        self.model = BertModel(config, add_pooling_layer=any(k.startswith("pooler.") for k in bert_state))
        try:
            self.model.load_state_dict(bert_state, strict=True)
        except RuntimeError as e:
            raise ModelMetricError(f"eval.chexbert_checkpoint: {ckpt} does not fit the encoder of "
                                   f"{tok_dir / 'config.json'}: {str(e)[:500]}") from e
        with _offline():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            except (OSError, ValueError) as e:
                raise ModelMetricError(f"eval.chexbert_tokenizer: cannot load a tokenizer from {tok_dir}: {e}") from e
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.heads = [(w.to(self.device), b.to(self.device)) for w, b in self.heads]
        self.batch_size = batch_size

    @staticmethod
    def _config(folder: Path, state: dict):
        from transformers import BertConfig

        if (folder / "config.json").is_file():
            return BertConfig.from_pretrained(str(folder))
        vocab, hidden = state["embeddings.word_embeddings.weight"].shape
        layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
        return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 64),
                          intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
                          type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0])

    def encode(self, text: str) -> list[int]:
        text = " ".join((text or "").replace("\n", " ").split())
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > CHEXBERT_MAX_TOKENS:
            ids = ids[:CHEXBERT_MAX_TOKENS - 1] + [self.tokenizer.sep_token_id]
        return ids

    def classes(self, texts: list[str]) -> np.ndarray:
        """(N, 14) head classes, in :data:`CHEXBERT_CONDITIONS` order."""
        import torch

        enc = [self.encode(t) for t in texts]
        out = np.zeros((len(texts), len(CHEXBERT_CONDITIONS)), dtype=np.int64)
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        pad = self.tokenizer.pad_token_id or 0
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(enc[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, :len(enc[i])] = torch.tensor(enc[i])
                    mask[row, :len(enc[i])] = 1
                cls = self.model(ids.to(self.device), attention_mask=mask.to(self.device))[0][:, 0, :].float()
                for j, (w, b) in enumerate(self.heads):
                    out[batch, j] = (cls @ w.T + b).argmax(-1).cpu().numpy()
        return out

    def label(self, texts: list[str]) -> list[dict[str, float | None]]:
        """CheXpert-style label dicts (as :func:`deepmedix.clinical.label` gives) for the texts."""
        out = []
        for row in self.classes(texts):
            d = dict.fromkeys(clinical.OBSERVATIONS)
            for cond, c in zip(CHEXBERT_CONDITIONS, row.tolist()):
                d[cond] = CHEXBERT_CLASSES[int(c)]
            out.append(d)
        return out


def check(cfg: Any) -> None:
    """Fail before any generation when a configured model path is unusable (a ModelMetricError, RadGraphError
    included, names the setting and the path)."""
    if getattr(cfg, "bertscore_model", ""):
        bertscore_layer(_folder("eval.bertscore_model", cfg.bertscore_model), cfg.bertscore_layers)
    if getattr(cfg, "chexbert_checkpoint", ""):
        if not Path(cfg.chexbert_checkpoint).expanduser().is_file():
            raise ModelMetricError(f"eval.chexbert_checkpoint: {cfg.chexbert_checkpoint!r} is not a file (give "
                                   "CheXbert's chexbert.pth; models are never downloaded)")
        if not cfg.chexbert_tokenizer or not Path(cfg.chexbert_tokenizer).expanduser().is_dir():
            raise ModelMetricError(f"eval.chexbert_tokenizer: {cfg.chexbert_tokenizer!r} is not a folder (give a "
                                   "bert-base-uncased folder with its tokenizer files and config.json)")


    if getattr(cfg, "radgraph_model", ""):
        _check_radgraph(cfg)


def _check_radgraph(cfg: Any) -> None:
    """The RadGraph settings, checked without loading the model: the package, the model type, the model folder's
    files and config (on a throw-away staging copy) or the archive, and the encoder folder."""
    import importlib.util
    import tarfile
    import tempfile

    from deepmedix.eval import radgraph as rg

    if importlib.util.find_spec("radgraph") is None:
        raise ModelMetricError(f"{rg.MODEL_SETTING} is set, but the radgraph package is not installed "
                               "(pip install radgraph==0.1.18; the eval extra has it)")
    if cfg.radgraph_type not in rg.MODEL_TYPES:
        raise ModelMetricError(f"eval.radgraph_type: {cfg.radgraph_type!r} is not one of {', '.join(rg.MODEL_TYPES)}")
    path = rg._model_path(cfg.radgraph_model)
    encoder = rg._encoder_path(cfg.radgraph_encoder) if cfg.radgraph_encoder else None
    if path.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            rg._stage(path, path, encoder, Path(tmp) / cfg.radgraph_type, cfg.radgraph_type)
    elif not tarfile.is_tarfile(path):
        raise rg.RadGraphError(f"{rg.MODEL_SETTING}: {cfg.radgraph_model!r} is neither a folder nor a tar archive")
    if encoder is not None and not (encoder / "config.json").is_file():
        raise rg.RadGraphError(f"{rg.ENCODER_SETTING}: {cfg.radgraph_encoder!r} has no config.json (give the BERT "
                               "folder as save_pretrained writes it)")


def meteor_missing() -> str | None:
    """Why METEOR cannot run here (no pycocoevalcap or no Java), or None."""
    from deepmedix.eval import meteor

    try:
        meteor._meteor_dir()
    except RuntimeError as e:
        return str(e)
    return None


def notes(cfg: Any, meteor_skipped: str | None = None) -> list[str]:
    """What the evaluation did not compute and why (shown with the metrics)."""
    out = [f"METEOR: not computed — {meteor_skipped}"] if meteor_skipped else []
    if not getattr(cfg, "bertscore_model", ""):
        out.append("BERTScore: not computed — set eval.bertscore_model to a local model folder "
                   "(e.g. roberta-large saved with save_pretrained)")
    if not getattr(cfg, "chexbert_checkpoint", ""):
        out.append("CheXbert F1: not computed — set eval.chexbert_checkpoint to chexbert.pth and "
                   "eval.chexbert_tokenizer to a bert-base-uncased tokenizer folder; the CheXpert F1 shown comes "
                   "from the built-in rule-based labeller")
    if not getattr(cfg, "radgraph_model", ""):
        out.append("RadGraph F1: not computed — set eval.radgraph_model to the RadGraph archive (radgraph.tar.gz) or "
                   "its extracted folder, and eval.radgraph_encoder to a local folder of the BERT its config.json "
                   "names unless that model is in the local Hugging Face cache")
    return out
