"""A saved folder in a key layout other than Qwen2.5-VL's stock one (what transformers 5.24 writes for ZeRO-3's
gathered weights: ``model.model.layers.*``) is rewritten in the stock layout, the same weights; a folder whose
weights do not map onto the model is an error, not a re-initialised model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepmedix.errors import ModelLoadError
from deepmedix.model.load import load
from deepmedix.model.tiny import build_tiny
from deepmedix.train.checkpoints import NOT_STOCK, restock, weight_keys


def _rewrite(folder, rename):
    sd = load_file(str(folder / "model.safetensors"))
    save_file({rename(k): v for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_restock_rewrites_the_zero3_layout_and_keeps_the_weights(tmp_path):
    stock = build_tiny(tmp_path / "m", texts=["the heart is enlarged"])
    assert restock(stock) is False and not any(k.startswith(NOT_STOCK) for k in weight_keys(stock))
    odd = tmp_path / "odd"
    shutil.copytree(stock, odd)
    _rewrite(odd, lambda k: "model." + k if k.startswith("model.") else k)
    assert any(k.startswith("model.model.layers.") for k in weight_keys(odd))
    assert restock(odd) is True
    assert sorted(weight_keys(odd)) == sorted(weight_keys(stock))
    a, b = load(stock).model.state_dict(), load(odd).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    broken = tmp_path / "broken"
    shutil.copytree(stock, broken)
    _rewrite(broken, lambda k: "model.model.junk." + k)
    with pytest.raises(ModelLoadError, match="do not map onto Qwen2.5-VL"):
        restock(broken)
