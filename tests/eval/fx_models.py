"""Fixtures: a tiny BERT folder (WordPiece tokenizer trained here, random weights) as save_pretrained writes it,
standing in for roberta-large / bert-base-uncased, which cannot be downloaded here."""

from __future__ import annotations

from pathlib import Path

CORPUS = ("the heart size is normal", "there is a small left pleural effusion", "no pneumothorax is seen",
          "mild cardiomegaly with pulmonary edema", "right lower lobe consolidation concerning for pneumonia",
          "bibasilar atelectasis", "lungs are clear", "no acute cardiopulmonary process",
          "endotracheal tube terminates above the carina", "there is no focal consolidation or effusion")


def tokenizer(folder: Path, max_length: int = 128):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(CORPUS) * 5, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    out = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)
    out.save_pretrained(folder)
    return out


def bert_config(vocab: int, layers: int = 3, hidden: int = 64, heads: int | None = None):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads or hidden // 64 or 1, intermediate_size=2 * hidden,
                      max_position_embeddings=128)


def bert_folder(folder: Path, seed: int = 0, layers: int = 3) -> Path:
    import torch
    from transformers import BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(folder)
    torch.manual_seed(seed)
    BertModel(bert_config(len(tok), layers)).eval().save_pretrained(folder)
    return folder


def chexbert_checkpoint(path: Path, tokenizer_dir: Path, seed: int = 0, biases: dict[int, int] | None = None,
                        layers: int = 2, write_config: bool = True, heads: int | None = None,
                        init_std: float | None = None) -> dict:
    """A checkpoint in CheXbert's released format (src/run_bert.py's torch.save: epoch, model_state_dict with
    DataParallel's 'module.' prefix, optimizer_state_dict), for a tiny BERT and 14 heads (13 x 4 classes, then
    'No Finding' x 2). ``biases``: head index -> class made to win on every text (a large bias). The tokenizer
    folder gets the tokenizer and, with ``write_config``, the encoder's config.json (as bert-base-uncased's folder
    has). ``heads``: attention heads (default one per 64 hidden units, what the loader infers without a config);
    ``init_std``: the encoder's initializer range (BERT's 0.02 leaves attention nearly uniform). Returns the state
    dict without the prefix."""
    import torch
    from transformers import BertModel

    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(tokenizer_dir, max_length=512)
    cfg = bert_config(len(tok), layers, heads=heads)
    cfg.max_position_embeddings = 512
    if init_std is not None:
        cfg.initializer_range = init_std
    if write_config:
        cfg.save_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    state = {f"bert.{k}": v for k, v in BertModel(cfg).state_dict().items()}
    for i in range(14):
        n = 2 if i == 13 else 4
        w, b = torch.randn(n, cfg.hidden_size) * 2.0, torch.zeros(n)
        if biases and i in biases:
            b[biases[i]] = 1e4
        state[f"linear_heads.{i}.weight"], state[f"linear_heads.{i}.bias"] = w, b
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 2e-5}]}}, path)
    return state
