"""RadGraph F1 with a RadGraph model the user supplies as a local path (nothing is downloaded).

The score is the one the ``radgraph`` package (0.1.18) computes — ``radgraph.F1RadGraph(reward_level="all")``, which
LLaVA-Rad's ``rrg_eval`` reports: the model (DyGIE++ on a BERT encoder) tags entities (ANAT-DP, OBS-DP, OBS-U,
OBS-DA) and relations (modify, located_at, suggestive_of) in both reports of a pair, and
``radgraph.rewards.compute_reward`` scores the two annotations at three levels:

* ``simple``: F1 over the sets of (entity tokens, label);
* ``partial``: F1 over (entity tokens, label, has-a-relation) — entities with no relation count as (tokens, label);
* ``complete``: F1 over (lower-cased tokens, label, relation, other entity's lower-cased tokens) for each relation,
  (tokens, label) for an entity with none.

A pair where either text is empty scores 0 at every level (F1RadGraph's rule), and so does a pair where either
annotation has no entity (compute_reward's rule). A text of only whitespace, on which the package fails, counts as
one with no entity (so its pairs score 0 too).

Settings: ``eval.radgraph_model`` is the extracted content of the released ``radgraph.tar.gz`` (a folder with
``config.json``, ``vocabulary/`` and ``weights.th``) or that archive itself. ``eval.radgraph_encoder`` (optional) is a
local folder of the BERT model that config.json names (its tokenizer and ``config.json``; the BERT weights come from
``weights.th``); without it the name in config.json is loaded from the local Hugging Face cache, offline.

The package's loader reads ``<model_cache_dir>/<model_type>/`` and downloads the archive when that folder is
missing; here it always runs on a staging copy in a temporary folder (config.json, patched for the encoder when one
is given; a copy of vocabulary/, where AllenNLP writes a lock file; weights.th linked), so it never downloads and
never writes into the user's folder.

transformers 5: the ``radgraph`` package vendors AllenNLP 1.x, which calls the tokenizer methods ``encode_plus`` and
``build_inputs_with_special_tokens``; transformers 5 removed both from its (fast) tokenizers.
:func:`install_transformers5_compat` gives the tokenizers the vendored code loads those two methods back, with
transformers 4's meaning (see there); :func:`radgraph_f1` calls it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from deepmedix.errors import InputError
from deepmedix.eval.model_based import ModelMetricError

MODEL_SETTING = "eval.radgraph_model"
ENCODER_SETTING = "eval.radgraph_encoder"
MODEL_TYPES = ("radgraph", "radgraph-xl")
LEVELS = ("simple", "partial", "complete")

# config.json entries the package's loader reads (radgraph/radgraph.py; the model's are DyGIE's arguments).
_BERT_NAME_KEYS = (("dataset_reader", "token_indexers", "bert", "model_name"),
                   ("model", "embedder", "token_embedders", "bert", "model_name"))
_REQUIRED_KEYS = (*_BERT_NAME_KEYS,
                  ("dataset_reader", "token_indexers", "bert", "max_length"), ("dataset_reader", "max_span_width"),
                  ("model", "embedder", "token_embedders", "bert", "max_length"),
                  *(("model", k) for k in ("type", "initializer", "module_initializer", "modules", "feature_size",
                                           "max_span_width", "target_task", "feedforward_params", "loss_weights")))


class RadGraphError(ModelMetricError):
    """A RadGraph model or encoder path that is missing or unusable; the message names the setting and the path."""


# ------------------------------------------------------------------------------------------ the score

def radgraph_f1(predictions: list[str], references: list[str], model: str, *, encoder: str = "",
                model_type: str = "radgraph") -> dict[str, np.ndarray]:
    """Per-pair RadGraph rewards ``{"simple", "partial", "complete"}`` (float arrays, one value per pair), each equal
    to what ``radgraph.F1RadGraph(reward_level="all", model_type=model_type)`` gives for that pair.

    ``model``: the extracted RadGraph archive (folder with config.json, vocabulary/, weights.th) or the .tar.gz.
    ``encoder``: local folder of the BERT model config.json names (optional, see the module doc)."""
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    out = {level: np.zeros(n, dtype=np.float64) for level in LEVELS}
    annotator = load(model, encoder=encoder, model_type=model_type)
    # F1RadGraph drops a pair whose hypothesis or reference is empty (len 0) and scores it 0.
    scored = [i for i in range(n) if len(predictions[i]) and len(references[i])]
    texts = list(dict.fromkeys([predictions[i] for i in scored] + [references[i] for i in scored]))
    annotations = annotate(annotator, texts)
    for i in scored:
        for level, value in pair_rewards(annotations[predictions[i]], annotations[references[i]]).items():
            out[level][i] = value
    return out


def pair_rewards(hypothesis: dict, reference: dict) -> dict[str, float]:
    """The three rewards of one pair of RadGraph annotations (``{"entities": {id: {"tokens", "label",
    "relations": [[relation, other id], ...]}}}``), by the package's ``radgraph.rewards.compute_reward``."""
    from radgraph.rewards import compute_reward

    return dict(zip(LEVELS, (float(v) for v in compute_reward(hypothesis, reference, "all"))))


def annotate(annotator: Any, texts: list[str]) -> dict[str, dict]:
    """RadGraph's annotation (``{"text", "entities", ...}``, as ``RadGraph.__call__`` gives it) of each text. The
    package runs one text at a time (batch of 1), so a text's annotation does not depend on the others.

    A text that the package's preprocessing turns into no tokens at all (only whitespace) gets no entities without
    running the model: the package fails on it (an AllenNLP assertion), and with no entities every reward of its
    pair is 0, as compute_reward gives for any pair where one side has no entity."""
    import torch
    from radgraph.utils import preprocess_reports

    result: dict[str, dict] = {}
    run = []
    for text in dict.fromkeys(texts):
        if preprocess_reports([text], annotator.model_type)[0]["sentences"][0]:
            run.append(text)
        else:
            result[text] = {"text": "", "entities": {}, "data_source": None, "data_split": "inference"}
    if run:
        with torch.no_grad():
            out = annotator(run)
        missing = [t for i, t in enumerate(run) if str(i) not in out]
        if missing:  # the package's postprocessing skips a report it fails on (and prints the traceback)
            raise RuntimeError(f"RadGraph could not annotate {len(missing)} report(s), e.g. {missing[0][:80]!r}")
        result.update({t: out[str(i)] for i, t in enumerate(run)})
    return result


# ------------------------------------------------------------------------------------------ loading

_MODELS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.RLock()


def load(model: str, *, encoder: str = "", model_type: str = "radgraph") -> Any:
    """The package's ``radgraph.RadGraph`` for a local model (and encoder), cached in-process per (model, encoder,
    model_type). Raises :class:`RadGraphError` for a path that is missing or unusable."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"model_type must be one of {', '.join(MODEL_TYPES)}, not {model_type!r}")
    path = _model_path(model)
    enc = _encoder_path(encoder) if encoder else None
    key = (str(path), str(enc or ""), model_type)
    with _LOCK:
        if key not in _MODELS:
            install_transformers5_compat()
            with tempfile.TemporaryDirectory(prefix="deepmedix-radgraph-") as tmp:
                root = _extract(path, Path(tmp) / "archive") if path.is_file() else path
                staged = _stage(root, path, enc, Path(tmp) / "cache" / model_type, model_type)
                _MODELS[key] = _construct(staged, path, enc, model_type)
        return _MODELS[key]


def _model_path(model: str) -> Path:
    if not str(model or "").strip():
        raise RadGraphError(f"{MODEL_SETTING} is not set: give the RadGraph model folder (the extracted "
                            "radgraph.tar.gz: config.json, vocabulary/, weights.th) or the .tar.gz itself")
    p = Path(model).expanduser()
    if not p.exists():
        raise RadGraphError(f"{MODEL_SETTING}: {str(model)!r} does not exist (give the extracted radgraph.tar.gz "
                            "folder or the archive; models are never downloaded)")
    if p.is_file() and not tarfile.is_tarfile(p):
        raise RadGraphError(f"{MODEL_SETTING}: {str(model)!r} is neither a folder nor a .tar.gz archive")
    if not p.is_file() and not p.is_dir():
        raise RadGraphError(f"{MODEL_SETTING}: {str(model)!r} is neither a folder nor a .tar.gz archive")
    return p.resolve()


def _encoder_path(encoder: str) -> Path:
    p = Path(encoder).expanduser()
    if not p.is_dir():
        raise RadGraphError(f"{ENCODER_SETTING}: {str(encoder)!r} is not a folder (give a local folder of the BERT "
                            "model the RadGraph config names, as save_pretrained writes it)")
    if not (p / "config.json").is_file():
        raise RadGraphError(f"{ENCODER_SETTING}: {str(encoder)!r} has no config.json (give a local folder of the "
                            "BERT model, with its tokenizer files and config.json)")
    return p.resolve()


def _extract(archive: Path, dest: Path) -> Path:
    """Extract the archive into ``dest``, refusing members that would land outside it (absolute paths, ``..``),
    links and special files. Returns the folder holding config.json: ``dest`` or its only subfolder."""
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                name = PurePosixPath(m.name)
                if name.is_absolute() or m.name.startswith(("/", "\\")) or ".." in name.parts or "\\" in m.name:
                    raise RadGraphError(f"{MODEL_SETTING}: {str(archive)!r} has a member that would be extracted "
                                        f"outside its folder ({m.name!r}); refusing to extract it")
                if not (m.isfile() or m.isdir()):
                    raise RadGraphError(f"{MODEL_SETTING}: {str(archive)!r} has a member that is not a plain file "
                                        f"or folder ({m.name!r}); refusing to extract it")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the stdlib's own safety net as well
                tar.extractall(dest, members=members, filter="data")
            else:
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RadGraphError(f"{MODEL_SETTING}: {str(archive)!r} cannot be read as a .tar.gz archive ({e})") from e
    if (dest / "config.json").exists():
        return dest
    subs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "config.json").exists():
        return subs[0]
    return dest


def _stage(root: Path, user_path: Path, encoder: Path | None, out: Path, model_type: str) -> Path:
    """Check ``root`` (the model folder) and lay out the copy the package reads: ``out`` = config.json (model_name
    entries pointing at ``encoder`` when given), a copy of vocabulary/, weights.th linked."""
    what = f"{MODEL_SETTING}: {str(user_path)!r}"
    if not (root / "config.json").is_file():
        raise RadGraphError(f"{what} has no config.json (expected the extracted radgraph.tar.gz: config.json, "
                            "vocabulary/, weights.th)")
    if not (root / "weights.th").is_file():
        raise RadGraphError(f"{what} has no weights.th (expected the extracted radgraph.tar.gz: config.json, "
                            "vocabulary/, weights.th)")
    vocab = root / "vocabulary"
    if not (vocab / "non_padded_namespaces.txt").is_file():
        raise RadGraphError(f"{what} has no vocabulary/ folder with non_padded_namespaces.txt (expected the "
                            "extracted radgraph.tar.gz: config.json, vocabulary/, weights.th)")
    if not (vocab / f"{model_type}__ner_labels.txt").is_file():
        found = sorted(p.name.removesuffix("__ner_labels.txt") for p in vocab.glob("*__ner_labels.txt"))
        hint = f" (it has the labels of model_type {', '.join(found)})" if found else ""
        raise RadGraphError(f"{what}: vocabulary/ has no {model_type}__ner_labels.txt, so it is not a "
                            f"{model_type!r} model{hint}")
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RadGraphError(f"{what}: config.json is not valid JSON ({e})") from e
    for keys in _REQUIRED_KEYS:
        if not isinstance(_get(config, keys[:-1]), dict) or keys[-1] not in _get(config, keys[:-1]):
            raise RadGraphError(f"{what}: config.json has no {'.'.join(keys)}, so it is not a RadGraph (DyGIE++) "
                                "model config")
    if encoder is not None:
        for keys in _BERT_NAME_KEYS:
            _get(config, keys[:-1])[keys[-1]] = str(encoder)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copytree(vocab, out / "vocabulary", ignore=shutil.ignore_patterns(".lock"))
    try:
        os.symlink(root / "weights.th", out / "weights.th")
    except OSError:
        shutil.copy2(root / "weights.th", out / "weights.th")
    return out


def _get(d: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _construct(staged: Path, user_path: Path, encoder: Path | None, model_type: str) -> Any:
    import pickle

    import radgraph.radgraph as rg
    import torch

    config = json.loads((staged / "config.json").read_text())
    names = sorted({str(_get(config, keys)) for keys in _BERT_NAME_KEYS})
    with _offline(), _no_download():
        for name in names:
            _check_encoder(name, encoder)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Using device: ..."
                return rg.RadGraph(model_type=model_type, model_cache_dir=str(staged.parent))
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            first = str(e).strip().splitlines()[:3]
            raise RadGraphError(f"{MODEL_SETTING}: weights.th in {str(user_path)!r} cannot be loaded into the model "
                                f"its config.json describes (with encoder {names[0]!r}): "
                                f"{' '.join(first)[:600]}") from e


def _check_encoder(name: str, encoder: Path | None) -> None:
    """Load the encoder's config and tokenizer (offline) before the package does, to say what is wrong."""
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(name)
        transformers.AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... here
        if encoder is not None:
            raise RadGraphError(f"{ENCODER_SETTING}: {str(encoder)!r} cannot be loaded as a BERT model folder with "
                                f"its tokenizer ({type(e).__name__}: {str(e)[:300]})") from e
        raise RadGraphError(f"the RadGraph model's config.json names the encoder {name!r}, which is not in the local "
                            f"Hugging Face cache (nothing is downloaded): set {ENCODER_SETTING} to a local folder of "
                            f"{name!r} (its tokenizer files and config.json, as save_pretrained writes them) "
                            f"({type(e).__name__}: {str(e)[:300]})") from e


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access off while the model loads: environment (read by later imports) and huggingface_hub's constant
    (read at its import, so setting the environment alone does not turn an imported huggingface_hub offline)."""
    import huggingface_hub.constants as hf_constants

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    old_const = hf_constants.HF_HUB_OFFLINE
    os.environ.update({k: "1" for k in keys})
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _no_download() -> Iterator[None]:
    """The package downloads the archive when its model folder is empty; the staged folder never is, and this makes
    sure no download could start anyway."""
    import radgraph.radgraph as rg

    def refuse(*args: Any, **kwargs: Any):
        raise RadGraphError(f"{MODEL_SETTING}: the radgraph package tried to download its model; models are "
                            "never downloaded here")

    old = rg.download_model
    rg.download_model = refuse
    try:
        yield
    finally:
        rg.download_model = old


# ------------------------------------------------------------------------------------------ transformers 5

def install_transformers5_compat() -> None:
    """Let the AllenNLP code vendored in ``radgraph`` (0.1.18) run on transformers 5 (idempotent; changes nothing
    under transformers 4).

    It calls two tokenizer methods that transformers 5 removed: ``encode_plus`` (one text or pair -> input_ids,
    token_type_ids, ...) and ``build_inputs_with_special_tokens`` (wordpiece ids of one segment -> the ids with the
    model's special tokens around them; used on every text, as the configs set ``max_length``). This wraps the
    vendored ``radgraph.allennlp.common.cached_transformers.get_tokenizer`` (through which all of its tokenizers are
    made) so that each tokenizer it returns gets, as instance attributes, where missing:

    * ``encode_plus`` = the tokenizer's ``__call__`` (what ``encode_plus`` was for a single, unbatched input);
    * ``build_inputs_with_special_tokens(ids)`` = the tokenizer's own start tokens + ids + its end tokens, read off
      how it encodes one word with and without special tokens: ``[CLS] ids [SEP]`` for BERT, as transformers 4's
      ``BertTokenizerFast`` built it.

    Nothing in transformers or site-packages is edited; other tokenizers in the process are untouched."""
    from radgraph.allennlp.common import cached_transformers

    current = cached_transformers.get_tokenizer
    if getattr(current, "_deepmedix_compat", False):
        return

    def get_tokenizer(model_name: str, **kwargs: Any):
        tokenizer = current(model_name, **kwargs)
        _add_legacy_methods(tokenizer)
        return tokenizer

    get_tokenizer._deepmedix_compat = True  # type: ignore[attr-defined]
    get_tokenizer.__wrapped__ = current  # type: ignore[attr-defined]
    cached_transformers.get_tokenizer = get_tokenizer


def _add_legacy_methods(tokenizer: Any) -> None:
    if not hasattr(tokenizer, "encode_plus"):
        tokenizer.encode_plus = tokenizer.__call__
    if not hasattr(tokenizer, "build_inputs_with_special_tokens"):
        start, end = _special_tokens_around(tokenizer)

        def build_inputs_with_special_tokens(token_ids_0: list[int], token_ids_1: list[int] | None = None):
            if token_ids_1 is not None:  # not used by the vendored code; a pair would need the mid tokens too
                raise NotImplementedError("build_inputs_with_special_tokens for a pair of segments")
            return start + list(token_ids_0) + end

        tokenizer.build_inputs_with_special_tokens = build_inputs_with_special_tokens


def _special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    for word in ("a", "1"):
        full = list(tokenizer(word, add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        for i in range(len(full) - len(plain) + 1):
            if plain and full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
    raise RuntimeError(f"cannot tell which special tokens {type(tokenizer).__name__} adds around a text")
