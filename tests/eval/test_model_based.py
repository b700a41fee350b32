"""Metrics with user-supplied models: BERTScore through bert-score on a local folder (checked against greedy cosine
matching computed here from the model's hidden states), CheXbert from a checkpoint in the released format, and
the clear errors and notes when a model is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fx_models import CORPUS, bert_folder, chexbert_checkpoint

from deepmedix.config import EvalConfig
from deepmedix.eval import model_based as mm
from deepmedix.eval import suite

PREDS = ["the heart size is normal", "small left effusion", "no pneumothorax", "",
         "mild cardiomegaly with edema and bibasilar atelectasis"]
REFS = ["the heart is normal in size", "there is a small left pleural effusion", "no pneumothorax is seen",
        "lungs are clear", "mild cardiomegaly with pulmonary edema"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("bert") / "tiny-bert")


def _greedy(folder, layer, preds, refs):
    """BERTScore by its definition: layer-``layer`` token embeddings, cosine similarity, each token's best match
    (over every token of the other side, [CLS]/[SEP] included), averaged over the non-special tokens."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def emb(text):
        ids = tok.encode(text.strip(), add_special_tokens=True)
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(h, dim=-1)

    out = []
    for p, r in zip(preds, refs):
        hp, hr = emb(p), emb(r)
        if len(hp) == 2:  # empty prediction: bert-score sets P and R to 0
            out.append((0.0, 0.0, 0.0))
            continue
        sim = hp @ hr.T
        prec, rec = float(sim.max(1).values[1:-1].mean()), float(sim.max(0).values[1:-1].mean())
        out.append((prec, rec, 2 * prec * rec / (prec + rec)))
    return np.array(out)


@pytest.mark.parametrize("layer", [1, 3])
def test_bertscore_is_greedy_cosine_matching_at_the_layer(bert, layer):
    got = mm.bertscore(PREDS, REFS, str(bert), layers=layer)
    want = _greedy(bert, layer, PREDS, REFS)
    np.testing.assert_allclose(np.stack([got["precision"], got["recall"], got["f1"]], 1), want, atol=2e-5)
    assert got["f1"][3] == 0.0 and 0 < got["f1"][0] <= 1.0


def test_bertscore_layer_choice(bert, tmp_path):
    assert mm.bertscore_layer(bert) == 3                        # unknown name: the last layer
    named = tmp_path / "bert-base-uncased"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"num_hidden_layers": 12}))
    assert mm.bertscore_layer(named) == 9                       # bert-score's table
    assert mm.bertscore_layer(named, 4) == 4
    with pytest.raises(mm.ModelMetricError, match="eval.bertscore_layers: 7"):
        mm.bertscore_layer(bert, 7)


def test_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(mm.ModelMetricError, match=r"eval.bertscore_model: '.*nowhere' is not a folder"):
        mm.bertscore(["a"], ["a"], str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(mm.ModelMetricError, match="has no config.json"):
        mm.bertscore(["a"], ["a"], str(tmp_path / "empty"))
    with pytest.raises(mm.ModelMetricError, match="eval.chexbert_checkpoint"):
        mm.CheXbert(str(tmp_path / "chexbert.pth"), str(tmp_path))


def _rows():
    return [{"id": f"r{i}", "task": "report_findings", "source": "phantom", "reference": r,
             "raw_output": f"<think>look</think> The answer is: \\boxed{{{p}}}"} for i, (p, r) in
            enumerate(zip(PREDS * 4, REFS * 4))]


def test_suite_adds_bertscore_with_intervals(bert):
    cfg = EvalConfig(bertscore_model=str(bert), bertscore_layers=2)
    res = suite.evaluate_rows(_rows(), rounds=50, meteor=False, models=cfg)["phantom/report_findings"]
    want = _greedy(bert, 2, PREDS, REFS)[:, 2].mean()
    assert res["bertscore_f1"]["value"] == pytest.approx(want, abs=2e-5)
    assert res["bertscore_f1"]["ci_low"] <= res["bertscore_f1"]["value"] <= res["bertscore_f1"]["ci_high"]
    assert "bertscore_f1" not in suite.evaluate_rows(_rows(), rounds=0, meteor=False)["phantom/report_findings"]
    assert any(n.startswith("BERTScore: not computed") for n in mm.notes(EvalConfig()))
    assert not any(n.startswith("BERTScore") for n in mm.notes(cfg))


def test_bertscore_idf_table_is_bert_scores(bert):
    from bert_score import score

    refs = REFS[:3] + REFS[4:]
    preds = PREDS[:3] + PREDS[4:]
    got = mm.bertscore(preds, refs, str(bert), layers=2, idf=True)
    p, r, f = score(preds, refs, model_type=str(bert), num_layers=2, idf=True, nthreads=0)
    np.testing.assert_allclose(got["f1"], f.numpy(), atol=1e-6)
    assert np.abs(got["f1"] - mm.bertscore(preds, refs, str(bert), layers=2)["f1"]).max() > 1e-4


@pytest.fixture(scope="module")
def chexbert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexbert")
    # Cardiomegaly positive, Edema uncertain, Pleural Effusion negative; Consolidation, Atelectasis, Fracture and
    # No Finding blank; the other heads vote at random (their weights). Four attention heads and weights larger than
    # BERT's 0.02 init, so that attention is far from uniform and its heads matter to the labels.
    biases = {1: 1, 4: 3, 5: 0, 7: 0, 9: 2, 11: 0, 13: 0}
    state = chexbert_checkpoint(root / "chexbert.pth", root / "bert-base-uncased", biases=biases, heads=4,
                                init_std=0.5)
    return root / "chexbert.pth", root / "bert-base-uncased", state


def _bert_labeler(state, tok_dir, texts):
    """CheXbert's bert_labeler forward written out in torch from the checkpoint's state dict (no transformers, in
    float64): embeddings (word + position + token type 0) and LayerNorm; per layer multi-head self-attention
    (softmax(QK^T / sqrt(head_dim)) V, no mask: one text at a time), output dense + residual + LayerNorm,
    intermediate dense + exact (erf) GELU, output dense + residual + LayerNorm; the last layer's [CLS] vector through
    the 14 linear heads, argmax each. Tokens from the ``tokenizers`` library on tokenizer.json, wrapped in
    [CLS] ... [SEP] and cut as CheXbert's tokenize does (over 512: the first 511, then [SEP])."""
    import math

    from tokenizers import Tokenizer

    cfg = json.loads((tok_dir / "config.json").read_text())
    assert cfg["hidden_act"] == "gelu" and cfg.get("position_embedding_type", "absolute") == "absolute"
    n_heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    p = {k: v.double() for k, v in state.items()}
    n_layers = len({k.split(".")[3] for k in p if k.startswith("bert.encoder.layer.")})
    assert n_layers == cfg["num_hidden_layers"]

    def dense(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]

    emb = "bert.embeddings"
    out = []
    for t in texts:
        ids = tok.encode(" ".join(t.replace("\n", " ").split()), add_special_tokens=False).ids
        ids = [cls_id] + ids + [sep_id]
        ids = ids[:511] + [sep_id] if len(ids) > 512 else ids
        n = len(ids)
        x = (p[f"{emb}.word_embeddings.weight"][ids] + p[f"{emb}.position_embeddings.weight"][:n]
             + p[f"{emb}.token_type_embeddings.weight"][0])
        x = layer_norm(x, f"{emb}.LayerNorm")
        for i in range(n_layers):
            pre = f"bert.encoder.layer.{i}"
            q, k, v = (dense(x, f"{pre}.attention.self.{m}").view(n, n_heads, -1).transpose(0, 1)
                       for m in ("query", "key", "value"))                            # (heads, n, head_dim)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            ctx = (att @ v).transpose(0, 1).reshape(n, -1)
            x = layer_norm(dense(ctx, f"{pre}.attention.output.dense") + x, f"{pre}.attention.output.LayerNorm")
            h = dense(x, f"{pre}.intermediate.dense")
            h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
            x = layer_norm(dense(h, f"{pre}.output.dense") + x, f"{pre}.output.LayerNorm")
        out.append([int(dense(x[0], f"linear_heads.{j}").argmax()) for j in range(14)])
    return np.array(out)


def test_chexbert_labels_as_the_released_model(chexbert):
    ckpt, tok_dir, state = chexbert
    texts = REFS + PREDS + list(CORPUS) + ["", "line one\nline two  with   spaces", "effusion " * 600]
    labeller = mm.CheXbert(str(ckpt), str(tok_dir), batch_size=3)
    want = _bert_labeler(state, tok_dir, texts)
    assert len({tuple(row) for row in want}) > 1          # the random heads tell the texts apart
    np.testing.assert_array_equal(labeller.classes(texts), want)
    assert len(labeller.encode("effusion " * 600)) == 512
    labels = labeller.label(texts)
    assert all(d["Cardiomegaly"] == 1.0 and d["Edema"] == -1.0 and d["Pleural Effusion"] == 0.0 for d in labels)
    assert all(d["Fracture"] is None and d["No Finding"] is None for d in labels)
    assert set(labels[0]) == set(mm.clinical.OBSERVATIONS)


def test_chexbert_without_config_infers_the_encoder(tmp_path):
    state = chexbert_checkpoint(tmp_path / "c.pth", tmp_path / "tok", seed=1, write_config=False)
    got = mm.CheXbert(str(tmp_path / "c.pth"), str(tmp_path / "tok")).classes(REFS)
    assert got.shape == (5, 14) and got[:, 13].max() <= 1
    del state


def test_chexbert_bad_checkpoints_name_the_problem(chexbert, tmp_path):
    ckpt, tok_dir, state = chexbert
    broken = dict(state)
    del broken["linear_heads.4.weight"]
    torch.save({"model_state_dict": broken}, tmp_path / "no_head.pth")
    with pytest.raises(mm.ModelMetricError, match=r"'module.linear_heads.4' \(Edema\) is missing"):
        mm.CheXbert(str(tmp_path / "no_head.pth"), str(tok_dir))
    (tmp_path / "torn.pth").write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(mm.ModelMetricError, match="cannot read .*torn.pth"):
        mm.CheXbert(str(tmp_path / "torn.pth"), str(tok_dir))
    with pytest.raises(mm.ModelMetricError, match="eval.chexbert_tokenizer: not set"):
        mm.CheXbert(str(ckpt), "")


def test_suite_adds_chexbert_f1(chexbert):
    ckpt, tok_dir, _ = chexbert
    cfg = EvalConfig(chexbert_checkpoint=str(ckpt), chexbert_tokenizer=str(tok_dir))
    res = suite.evaluate_rows(_rows(), rounds=20, meteor=False, models=cfg)["phantom/report_findings"]
    # the five: Cardiomegaly and Edema (uncertain counts positive) positive in every text, the other three never
    assert 0.0 < res["chexbert_micro_f1"]["value"] <= 1.0 and "chexbert_macro_f1_5" in res
    assert res["chexbert_micro_f1_5"]["value"] == pytest.approx(1.0)
    assert not any(n.startswith("CheXbert") for n in mm.notes(cfg))


def test_bad_model_paths_fail_before_any_generation(tmp_path):
    from deepmedix.eval.run import evaluate

    cfg = EvalConfig(bertscore_model=str(tmp_path / "no-such-model"))
    with pytest.raises(mm.ModelMetricError, match="eval.bertscore_model"):  # the data is never opened
        evaluate(cfg, str(tmp_path / "no-data"), str(tmp_path / "no-model"), str(tmp_path / "out"))
    cfg = EvalConfig(chexbert_checkpoint=str(tmp_path / "chexbert.pth"))
    with pytest.raises(mm.ModelMetricError, match="eval.chexbert_checkpoint"):
        mm.check(cfg)
    assert not (tmp_path / "out").exists()
    assert (mm.notes(EvalConfig(), "METEOR needs a Java runtime")[0]
            == "METEOR: not computed — METEOR needs a Java runtime")


def test_suite_adds_radgraph_f1_levels(tmp_path):
    import fx_radgraph

    from deepmedix.eval.radgraph import RadGraphError, radgraph_f1

    fx = fx_radgraph.build(tmp_path / "rg")
    cfg = EvalConfig(radgraph_model=str(fx["native_tar"]), radgraph_encoder=str(fx["encoder"]))
    mm.check(cfg)
    res = suite.evaluate_rows(_rows(), rounds=20, meteor=False, models=cfg)["phantom/report_findings"]
    direct = radgraph_f1(PREDS * 4, REFS * 4, str(fx["native_tar"]), encoder=str(fx["encoder"]))
    for level in ("simple", "partial", "complete"):
        v = res[f"radgraph_f1_{level}"]
        assert v["value"] == pytest.approx(direct[level].mean()) and 0 < v["value"] < 1
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
    assert not any(n.startswith("RadGraph") for n in mm.notes(cfg))
    assert any(n.startswith("RadGraph F1: not computed") for n in mm.notes(EvalConfig()))
    with pytest.raises(RadGraphError, match="eval.radgraph_model"):
        mm.check(EvalConfig(radgraph_model=str(tmp_path / "missing.tar.gz")))
    (tmp_path / "not.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(RadGraphError, match="is neither a folder nor a"):
        mm.check(EvalConfig(radgraph_model=str(tmp_path / "not.tar.gz")))
    with pytest.raises(mm.ModelMetricError, match="eval.radgraph_type"):
        mm.check(EvalConfig(radgraph_model=str(fx["native"]), radgraph_type="radgraph_xl"))
    with pytest.raises(RadGraphError, match="radgraph-xl"):  # the folder's vocabulary is a radgraph model's
        mm.check(EvalConfig(radgraph_model=str(fx["native"]), radgraph_type="radgraph-xl"))
    with pytest.raises(RadGraphError, match="has no config.json"):
        mm.check(EvalConfig(radgraph_model=str(fx["native"]), radgraph_encoder=str(tmp_path)))
