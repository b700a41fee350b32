"""RadGraph F1 (deepmedix.eval.radgraph) on a tiny RadGraph model in the released archive's layout (fx_radgraph),
checked against the ``radgraph`` package's own end-to-end F1RadGraph, against F1 values worked out by hand, and for
the errors a user gets for a bad model or encoder path. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile

import fx_radgraph
import numpy as np
import pytest

from deepmedix.eval import radgraph as rg

LONG = " ".join(["there is a small left pleural effusion with mild cardiomegaly and pulmonary edema ."] * 12)
# (prediction, reference): corpus sentences, unseen words, punctuation, an identical pair, empty sides, and a text
# longer than the encoder's 128 wordpieces (the package folds it into segments).
PAIRS = [
    ("the heart size is normal", "the heart size is normal"),
    ("there is a small left pleural effusion", "small left pleural effusion."),
    ("no pneumothorax is seen", "no pneumothorax"),
    ("mild cardiomegaly with pulmonary edema", "mild cardiomegaly, no edema"),
    ("", "lungs are clear"),
    ("lungs are clear", ""),
    ("bibasilar atelectasis", "bibasilar atelectasis and right lower lobe consolidation concerning for pneumonia"),
    (LONG, "small left effusion"),
    ("endotracheal tube terminates above the carina", "ET tube 4 cm above the carina (unchanged)"),
    ("the heart size is normal", "no acute cardiopulmonary process"),
]
PREDS, REFS = [p for p, _ in PAIRS], [r for _, r in PAIRS]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return fx_radgraph.build(tmp_path_factory.mktemp("radgraph"))


@pytest.fixture(scope="module")
def package_rewards(fx):
    """The package's own end-to-end result: F1RadGraph on the fixture model, as its model_cache_dir."""
    from radgraph import F1RadGraph

    rg.install_transformers5_compat()  # the vendored AllenNLP needs it under transformers 5
    f1 = F1RadGraph(reward_level="all", model_type="radgraph", model_cache_dir=str(fx["cache"]))
    _, (simple, partial, complete), hyp_ann, ref_ann = f1(refs=REFS, hyps=PREDS)
    return {"simple": simple, "partial": partial, "complete": complete, "hyp": hyp_ann, "ref": ref_ann}


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("source", ["folder", "tar", "folder+encoder", "tar+encoder"])
def test_matches_package_f1radgraph(fx, package_rewards, source):
    """Per-pair values equal F1RadGraph's for the extracted folder, the .tar.gz, and (with eval.radgraph_encoder)
    the native config that names a hub model; the model folder is left as it was."""
    model = {"folder": fx["local"], "tar": fx["tar"], "folder+encoder": fx["native"],
             "tar+encoder": fx["native_tar"]}[source]
    encoder = str(fx["encoder"]) if "encoder" in source else ""
    before = _tree(fx["native"]), _tree(fx["local"])
    out = rg.radgraph_f1(PREDS, REFS, str(model), encoder=encoder)
    assert set(out) == {"simple", "partial", "complete"}
    for level in rg.LEVELS:
        assert out[level].shape == (len(PAIRS),)
        np.testing.assert_array_equal(out[level], np.array(package_rewards[level], dtype=float), err_msg=level)
    assert (_tree(fx["native"]), _tree(fx["local"])) == before
    # The fixture is not trivial: entities and relations found, values strictly between 0 and 1, levels differ.
    entities = [len(a["entities"]) for a in package_rewards["hyp"]]
    relations = [sum(len(e["relations"]) for e in a["entities"].values()) for a in package_rewards["hyp"]]
    assert sum(n > 0 for n in entities) >= 5 and sum(relations) >= 5
    assert ((out["simple"] > 0) & (out["simple"] < 1)).sum() >= 3
    assert (out["simple"] != out["complete"]).any() and (out["partial"] != out["complete"]).any()
    assert out["simple"][0] == out["partial"][0] == out["complete"][0] == 1.0  # identical texts
    assert out["simple"][4] == out["simple"][5] == 0.0  # an empty side


def test_loaded_once_and_cached(fx):
    a = rg.load(str(fx["local"]))
    assert rg.load(str(fx["local"]) + "/") is a  # same folder, same loaded model
    assert rg.load(str(fx["native"]), encoder=str(fx["encoder"])) is not a


def _entity(tokens, label, *relations):
    return {"tokens": tokens, "label": label, "start_ix": 0, "end_ix": 0, "relations": [list(r) for r in relations]}


def test_levels_by_hand():
    """Hypothesis: effusion (OBS-DP) located_at pleural; pleural (ANAT-DP); edema (OBS-DP) located_at pleural (the
    wrong place); opacity (OBS-DP) with no relation; cardiomegaly (OBS-DP). Reference: effusion located_at pleural;
    pleural; edema located_at pulmonary; pulmonary (ANAT-DP); opacity located_at basal; basal (ANAT-DP).

    simple   (tokens, label): hyp 5, ref 6, common effusion, pleural, edema, opacity = 4 ->
             P 4/5, R 4/6, F1 = 2*(4/5)*(2/3) / (4/5 + 2/3) = 8/11
    partial  (tokens, label, has a relation) / (tokens, label) without: common effusion+rel, pleural, edema+rel = 3
             (opacity has a relation only in the reference) -> P 3/5, R 3/6, F1 = 6/11
    complete (tokens, label, relation, target tokens) / (tokens, label) without: common effusion-located_at-pleural,
             pleural = 2 (edema points elsewhere) -> P 2/5, R 2/6, F1 = 4/11"""
    hyp = {"entities": {"1": _entity("effusion", "OBS-DP", ("located_at", "2")), "2": _entity("pleural", "ANAT-DP"),
                        "3": _entity("edema", "OBS-DP", ("located_at", "2")), "4": _entity("opacity", "OBS-DP"),
                        "5": _entity("cardiomegaly", "OBS-DP")}}
    ref = {"entities": {"1": _entity("effusion", "OBS-DP", ("located_at", "2")), "2": _entity("pleural", "ANAT-DP"),
                        "3": _entity("edema", "OBS-DP", ("located_at", "4")), "4": _entity("pulmonary", "ANAT-DP"),
                        "5": _entity("opacity", "OBS-DP", ("located_at", "6")), "6": _entity("basal", "ANAT-DP")}}
    expected = {"simple": 8 / 11, "partial": 6 / 11, "complete": 4 / 11}
    assert rg.pair_rewards(hyp, ref) == pytest.approx(expected)
    assert rg.pair_rewards(ref, hyp) == pytest.approx(expected)  # F1 is symmetric
    assert rg.pair_rewards(hyp, hyp) == {"simple": 1.0, "partial": 1.0, "complete": 1.0}
    assert rg.pair_rewards(hyp, {"entities": {}}) == {"simple": 0.0, "partial": 0.0, "complete": 0.0}


def test_identical_and_empty(fx):
    model = rg.load(str(fx["local"]))
    texts = ["there is a small left pleural effusion", "mild cardiomegaly with pulmonary edema"]
    assert all(rg.annotate(model, texts)[t]["entities"] for t in texts)  # they have entities, so 1.0 means a match
    out = rg.radgraph_f1(texts + ["", "", "lungs are clear", "   "], texts + ["", "lungs are clear", "", "no edema"],
                         str(fx["local"]))
    for level in rg.LEVELS:
        assert out[level].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0], level
    assert rg.radgraph_f1([], [], str(fx["local"])) == {level: pytest.approx(np.zeros(0)) for level in rg.LEVELS}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rg.radgraph_f1(["a", "b"], ["a"], str(fx["local"]))


# ------------------------------------------------------------------------------------------ errors

def test_missing_path(tmp_path):
    with pytest.raises(rg.RadGraphError, match=r"eval\.radgraph_model: .*nope.* does not exist"):
        rg.radgraph_f1(["a"], ["a"], str(tmp_path / "nope"))
    with pytest.raises(rg.RadGraphError, match=r"eval\.radgraph_model is not set"):
        rg.radgraph_f1(["a"], ["a"], "")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(rg.RadGraphError,
                       match=r"eval\.radgraph_model: .*notes\.txt.* neither a folder nor a \.tar\.gz"):
        rg.radgraph_f1(["a"], ["a"], str(tmp_path / "notes.txt"))


def test_folder_without_weights(fx, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fx["local"], model)
    (model / "weights.th").unlink()
    with pytest.raises(rg.RadGraphError, match=rf"eval\.radgraph_model: '{model}' has no weights\.th"):
        rg.radgraph_f1(["a"], ["a"], str(model))
    shutil.copy(fx["local"] / "weights.th", model / "weights.th")
    cfg = json.loads((model / "config.json").read_text())
    del cfg["model"]["embedder"]["token_embedders"]["bert"]["model_name"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rg.RadGraphError,
                       match=r"config\.json has no model\.embedder\.token_embedders\.bert\.model_name"):
        rg.load(str(model))
    shutil.rmtree(model / "vocabulary")
    with pytest.raises(rg.RadGraphError, match=r"no vocabulary/"):
        rg.load(str(model))
    (model / "config.json").unlink()
    with pytest.raises(rg.RadGraphError, match=r"has no config\.json"):
        rg.load(str(model))


def test_wrong_model_type(fx):
    with pytest.raises(rg.RadGraphError, match=r"no radgraph-xl__ner_labels\.txt.*model_type radgraph\b"):
        rg.load(str(fx["local"]), model_type="radgraph-xl")


def test_weights_that_do_not_fit(fx, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fx["local"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model"]["feedforward_params"]["hidden_dims"] = 2 * fx_radgraph.HIDDEN
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rg.RadGraphError,
                       match=r"eval\.radgraph_model: weights\.th in .* cannot be loaded .*size mismatch"):
        rg.load(str(model))


def _add(tar, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_with_parent_member(fx, tmp_path):
    bad = tmp_path / "sub" / "radgraph.tar.gz"
    bad.parent.mkdir()
    with tarfile.open(bad, "w:gz") as tar:
        for item in sorted(fx["local"].iterdir()):
            tar.add(item, arcname=item.name)
        _add(tar, "../evil.txt")
    with pytest.raises(rg.RadGraphError, match=r"eval\.radgraph_model: .*radgraph\.tar\.gz.*outside.*\.\./evil\.txt"):
        rg.radgraph_f1(["a"], ["a"], str(bad))
    assert not (tmp_path / "evil.txt").exists()
    absolute = tmp_path / "abs.tar.gz"
    with tarfile.open(absolute, "w:gz") as tar:
        _add(tar, str(tmp_path / "evil2.txt"))
    with pytest.raises(rg.RadGraphError, match=r"outside"):
        rg.load(str(absolute))
    assert not (tmp_path / "evil2.txt").exists()


def test_encoder_folder_missing(fx, tmp_path):
    with pytest.raises(rg.RadGraphError, match=rf"eval\.radgraph_encoder: '{tmp_path}/no-bert' is not a folder"):
        rg.radgraph_f1(["a"], ["a"], str(fx["native"]), encoder=str(tmp_path / "no-bert"))


def test_uncached_hub_encoder_without_encoder_setting(fx, tmp_path, monkeypatch):
    """The native config names a hub model; without eval.radgraph_encoder it is looked up offline only, and the
    error says to set the encoder, naming the model. No connection (nor name lookup) is attempted: the test sets
    HF_HUB_OFFLINE in the environment, but huggingface_hub, imported already, read it at import, so it is the
    module's own offline switch that is checked here."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # an empty Hugging Face cache, whatever this machine's holds
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    model = tmp_path / "model"
    shutil.copytree(fx["native"], model)
    cfg = json.loads((model / "config.json").read_text())
    name = "deepmedix-tests/not-a-cached-bert"
    cfg["dataset_reader"]["token_indexers"]["bert"]["model_name"] = name
    cfg["model"]["embedder"]["token_embedders"]["bert"]["model_name"] = name
    (model / "config.json").write_text(json.dumps(cfg))
    connects = []

    def connect(self, address):
        connects.append(address)
        raise OSError("no network in tests")

    def getaddrinfo(*args, **kwargs):
        connects.append(args)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for m in (model, fx["native"]):
        expected = name if m == model else fx_radgraph.HUB_NAME
        with pytest.raises(rg.RadGraphError, match=rf"names the encoder '{expected}'.*set eval\.radgraph_encoder"):
            rg.radgraph_f1(["a"], ["a"], str(m))
    assert connects == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline_before  # switched back after loading
