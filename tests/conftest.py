"""Shared fixtures: a small phantom dataset and a tiny base model, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small sizes for stage tests: a handful of records, a few optimizer steps.
SMALL_CURATE = ["n_patients=8", "image_size=128", "vqa_per_study=2"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    from deepmedix import stages

    out = tmp_path_factory.mktemp("data") / "phantom"
    stages.curate(str(out), "tiny", SMALL_CURATE)
    return out


@pytest.fixture(scope="session")
def base_model_dir(small_data, tmp_path_factory):
    from deepmedix import stages

    out = tmp_path_factory.mktemp("model") / "base"
    stages.base_model(str(small_data), str(out), "tiny", ["num_hidden_layers=2", "hidden_size=64",
                                                          "intermediate_size=128", "vocab_size=800"])
    return out
