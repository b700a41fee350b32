from __future__ import annotations

import json
import os

import pytest

from deepmedix import store
from deepmedix.config import ConfigError, GRPOConfig, SFTConfig, load_config


def test_every_stage_has_a_tiny_config():
    for stage in ("curate", "model", "sft", "coldstart", "grpo", "eval"):
        assert load_config(stage, "tiny") is not None


def test_overrides_and_types():
    cfg = load_config("sft", "tiny", ["max_steps=3", "learning_rate=1e-4", "tasks=[vqa]"])
    assert isinstance(cfg, SFTConfig)
    assert (cfg.max_steps, cfg.learning_rate, cfg.tasks) == (3, 1e-4, ["vqa"])
    assert isinstance(load_config("grpo", "tiny"), GRPOConfig)


def test_the_frame_setting():
    assert load_config("grpo", "tiny").frame == "auto" and load_config("eval", "tiny").frame == "auto"
    assert load_config("sft", "tiny").frame == "square512"  # the tiny model's budget (its comment says why)
    assert load_config("sft", "7b").frame == load_config("eval", "7b").frame == "native"
    assert load_config("eval", "tiny", ["frame=512"]).frame == "square512"  # the old integer setting
    for bad in ("square", "squared512", "nat", "0"):
        with pytest.raises(ConfigError, match="key 'frame': expected 'auto', 'native' or 'squareN'"):
            load_config("eval", "tiny", [f"frame={bad}"])


def test_bad_config_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*max_stepz"):
        load_config("sft", str(bad))
    with pytest.raises(ConfigError, match="key 'max_steps': expected int"):
        load_config("sft", "tiny", ["max_steps=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("sft", "huge")


def test_atomic_dir_publishes_only_on_success(tmp_path):
    dest = tmp_path / "artifact"
    with pytest.raises(RuntimeError):
        with store.atomic_dir(dest) as d:
            (d / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with store.atomic_dir(dest) as d:
        (d / "ok.txt").write_text("1")
        store.write_lineage(d, "unit", {"a": 1})
    assert (dest / "ok.txt").read_text() == "1"
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask  # readable like any folder, not mkdtemp's 0700
    lin = json.loads((dest / "lineage.json").read_text())
    assert lin["stage"] == "unit" and lin["config"] == {"a": 1} and len(lin["sha256"]) == 64
    # replacing an existing artifact keeps the old one until the new one is complete
    with pytest.raises(RuntimeError):
        with store.atomic_dir(dest) as d:
            raise RuntimeError("boom")
    assert (dest / "ok.txt").read_text() == "1"


def test_lineage_records_input_hashes(tmp_path):
    src = tmp_path / "in"
    with store.atomic_dir(src) as d:
        (d / "f").write_text("data")
        store.write_lineage(d, "first")
    out = tmp_path / "out"
    with store.atomic_dir(out) as d:
        store.write_lineage(d, "second", inputs={"src": str(src)})
    lin = store.read_lineage(out)
    assert lin["inputs"]["src"]["sha256"] == store.read_lineage(src)["sha256"]
    with pytest.raises(store.StoreError, match="no such file"):
        store.fetch(tmp_path / "missing")


def test_every_stage_has_a_7b_config_with_the_papers_sizes():
    from deepmedix.config import STAGES, load_size

    cfgs = load_size("7b")
    assert set(cfgs) == set(STAGES)
    assert cfgs["sft"].max_records == 351_500                          # the SFT mix
    assert cfgs["coldstart"].max_kept == 3_900 and cfgs["coldstart"].teacher == "openai"
    assert cfgs["grpo"].max_records == 6_600                           # the RL prompts
    assert cfgs["eval"].max_new_tokens >= 1024 and cfgs["eval"].batch_size > 1 and cfgs["eval"].max_records == 0
    assert cfgs["model"].build == "checkpoint" and cfgs["curate"].sources and cfgs["arena"].judges
    with pytest.raises(ConfigError, match=r"size '13b': no config for configs/curate/13b.yaml, configs/model/13b"):
        load_size("13b")
