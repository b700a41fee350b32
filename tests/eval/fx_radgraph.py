"""Fixtures: a tiny RadGraph model in the layout of the released ``radgraph.tar.gz`` (the folder the ``radgraph``
package extracts to ``<model_cache_dir>/radgraph/``: ``config.json``, ``vocabulary/``, ``weights.th``), built with the
package's own DyGIE++ classes on a tiny random BERT (fx_models' corpus and BertConfig, a fixed WordPiece
vocabulary), since the real weights cannot be downloaded here.

The config has the structure of DyGIE++'s training-config template in the layout radgraph.py reads (AllenNLP's
expanded config: ``dataset_reader`` with a ``pretrained_transformer_mismatched`` ``bert`` indexer, ``model`` with
``embedder.token_embedders.bert``, ``modules``, ``loss_weights`` ...), only with small sizes. The NER and relation
scorers get biases so that the random model still tags a fair share of spans and links some of them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

ENTITY_LABELS = ("OBS-DP", "ANAT-DP", "OBS-DA", "OBS-U")
RELATION_LABELS = ("modify", "located_at", "suggestive_of")
DATASET = "radgraph"  # the package's model_type; DyGIE++ prefixes the label namespaces with it
HUB_NAME = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"  # a hub name, as a released config names one

# Sizes: small, so that building and running stay fast on 2 cores.
MAX_SPAN_WIDTH = 3
FEATURE_SIZE = 8
HIDDEN = 32
MAX_LENGTH = 128


def encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT folder (WordPiece tokenizer, config.json, random weights) as save_pretrained writes it. The
    vocabulary is fixed (special tokens, the words of fx_models.CORPUS, single characters and their ``##`` forms)
    rather than trained, so that the fixture is the same in every process."""
    import torch
    from fx_models import CORPUS, bert_config
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in CORPUS for w in line.split()})
    chars = sorted({c for line in CORPUS for c in line if c != " "} | set("0123456789.,:;-/()"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[c for c in chars if c not in words],
             *[f"##{c}" for c in chars]]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    BertModel(bert_config(len(vocab), layers=1)).eval().save_pretrained(folder)
    return folder


def config(bert_name: str) -> dict:
    """config.json as AllenNLP writes it after a DyGIE++ training run (RadGraph's layout: ``model.embedder``)."""
    bert = {"type": "pretrained_transformer_mismatched", "model_name": bert_name, "max_length": MAX_LENGTH}
    return {
        "dataset_reader": {"type": "dygie", "token_indexers": {"bert": dict(bert)}, "max_span_width": MAX_SPAN_WIDTH},
        "train_data_path": "data/radgraph/train.json",
        "validation_data_path": "data/radgraph/dev.json",
        "test_data_path": "data/radgraph/test.json",
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": dict(bert)}},
            "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
            "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}],
                                               [".*weight_matrix", {"type": "xavier_normal"}]]},
            "loss_weights": {"ner": 0.2, "relation": 1.0, "coref": 0.0, "events": 0.0},
            "feature_size": FEATURE_SIZE,
            "max_span_width": MAX_SPAN_WIDTH,
            "target_task": "relation",
            "feedforward_params": {"num_layers": 2, "hidden_dims": HIDDEN, "dropout": 0.4},
            "modules": {
                "coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0},
                "ner": {},
                "relation": {"spans_per_word": 0.5},
                "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                           "loss_weights": {"trigger": 1.0, "arguments": 1.0}},
            },
        },
        "data_loader": {"batch_sampler": {"type": "bucket", "batch_size": 1}},
        "trainer": {"num_epochs": 1, "grad_norm": 5.0, "patience": 5, "cuda_device": -1,
                    "validation_metric": "+MEAN__relation_f1",
                    "optimizer": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.0}},
    }


def vocabulary(folder: Path):
    """The AllenNLP vocabulary folder (``non_padded_namespaces.txt``, one ``<namespace>.txt`` per label set), written
    by the package's own Vocabulary. NER labels start with the empty (null) label at index 0, as DyGIE++ needs."""
    from radgraph.allennlp.data import Vocabulary

    vocab = Vocabulary()
    vocab.add_tokens_to_namespace(["", *ENTITY_LABELS], f"{DATASET}__ner_labels")
    vocab.add_tokens_to_namespace(list(RELATION_LABELS), f"{DATASET}__relation_labels")
    vocab.save_to_files(str(folder))
    (folder / ".lock").unlink(missing_ok=True)  # the FileLock's file, not part of a release
    return vocab


def model_folder(folder: Path, encoder_dir: Path, bert_name: str | None = None, seed: int = 0,
                 ner_scale: float = 10.0, ner_bias: float = -1.6, relation_bias: float = 3.0) -> Path:
    """Write ``folder`` = config.json + vocabulary/ + weights.th (the whole DyGIE state dict, BERT included). The
    config names ``bert_name`` (default: the encoder folder's path) as the transformer; the model is built on
    ``encoder_dir`` either way."""
    import torch
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie
    from transformers import BertModel

    from deepmedix.eval.radgraph import install_transformers5_compat

    install_transformers5_compat()  # the package's tokenizer code, under transformers 5
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config(bert_name or str(encoder_dir))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    vocab = vocabulary(folder / "vocabulary")

    bert = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=str(encoder_dir), max_length=MAX_LENGTH)
    # The package makes the BERT from its config (random); a real weights.th holds the fine-tuned BERT: here the
    # encoder folder's weights, so that the fixture does not depend on what the process drew before.
    bert._matched_embedder.transformer_model.load_state_dict(BertModel.from_pretrained(encoder_dir).state_dict())
    embedder = text_field_embedders.BasicTextFieldEmbedder({"bert": bert})
    kwargs = {k: v for k, v in cfg["model"].items()
              if k not in ("type", "embedder", "initializer", "module_initializer")}
    torch.manual_seed(seed)
    model = dygie.DyGIE(vocab=vocab, embedder=embedder, **kwargs)
    with torch.no_grad():
        # NER: the last Linear scores the 4 labels against a fixed 0 for the null label.
        ner_out = model._ner._ner_scorers[f"{DATASET}__ner_labels"][1]._module
        ner_out.weight.mul_(ner_scale)
        ner_out.bias.fill_(ner_bias)
        # Relations: the scorer's Linear (3 labels vs a fixed 0 for none), plus the pruner's mention scores.
        model._relation._relation_scorers[f"{DATASET}__relation_labels"].bias.fill_(relation_bias)
    torch.save(model.state_dict(), folder / "weights.th")
    return folder


def archive(folder: Path, path: Path) -> Path:
    """Pack ``folder`` as the released .tar.gz: config.json, vocabulary/, weights.th at the top of the archive."""
    with tarfile.open(path, "w:gz") as tar:
        for item in sorted(folder.iterdir()):
            tar.add(item, arcname=item.name)
    return path


def build(root: Path, seed: int = 0) -> dict[str, Path]:
    """Everything the tests use, under ``root``:

    - ``encoder``: the tiny BERT folder;
    - ``local``: model folder whose config names the encoder by its path (the package runs it as is);
    - ``cache``: a ``model_cache_dir`` for the package, holding ``local`` as ``radgraph/``;
    - ``native``: the same weights, config naming a hub model (as the released archive does);
    - ``tar``: ``local`` packed as ``radgraph.tar.gz``; ``native_tar``: ``native`` packed."""
    import shutil

    enc = encoder(root / "encoder", seed=seed)
    local = model_folder(root / "cache" / DATASET, enc, seed=seed)
    native = root / "native"
    shutil.copytree(local, native)
    (native / "config.json").write_text(json.dumps(config(HUB_NAME), indent=2))
    return {"encoder": enc, "local": local, "cache": root / "cache", "native": native,
            "tar": archive(local, root / "radgraph.tar.gz"), "native_tar": archive(native, root / "native.tar.gz")}
