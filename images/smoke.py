"""``make images-smoke``: build the three images, run each as uid 1000 on a read-only root filesystem with a
writable /tmp, and check that nothing of the build's secrets is in them.

    python images/smoke.py [--no-build] [--images "data train serving"] [--registry R] [--version V]

The images are built by ``images/build.sh`` (with ``BASE``, ``ENGINE``, ``BUILD_ARGS`` from the environment, and a
fresh ``DEEPMEDIX_SECRETS_CANARY`` written into the secrets). Each runs daemonless, as a container runtime would run
it: the image's filesystem (``buildah mount``) bind-mounted read-only at ``/`` by bubblewrap, a fresh /proc, /dev
(with a 1777 /dev/shm, as runtimes give) and PID namespace, tmpfs at /tmp, the image's Env and WorkingDir, then
``setpriv`` to uid/gid 1000 with no capabilities (a real uid 1000, so file modes count). A shared work folder (a
volume, mounted at /work) carries the data image's dataset to the train image and its model to the serving image:

* data: ``deepmedix data phantom`` and a small ``deepmedix curate`` of the phantom set; records written;
* train: torch, transformers, trl, deepspeed and peft import, ``torch.version.cuda`` is 13.x, the PyPI nvcc
  compiles and links a CUDA extension through ``torch.utils.cpp_extension`` (the path DeepSpeed's JIT ops take;
  nothing runs on a GPU here), the tiny model is built and trained for two SFT steps on the CPU;
* serving: ``deepmedix serve`` on that model mounted read-only at /mnt/models answers a v1 request, the OpenAI
  route (the ``openai`` client, with the image as an ``image_url`` part) and ``/metrics``; and a copy of the model
  with one root-owned 0600 file makes it stop with "permission denied", the path and uid 1000.

Every file the images write is checked for ordinary modes (0644 files, 0755 folders). Then ``images/layers.py``
inspects the three images' history, configuration and layers. One line per image, ``image NAME: ok (SIZE)``;
exit 1 on any failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UID = 1000


class SmokeError(Exception):
    pass


def sh(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


class Container:
    """An image's filesystem, mounted, and a way to run a command in it (read-only root, uid 1000)."""

    def __init__(self, image: str):
        self.image = image
        config = json.loads(sh(["buildah", "inspect", "--type", "image", image]))["OCIv1"]["config"]
        self.env = dict(e.split("=", 1) for e in config.get("Env", []))
        self.workdir = config.get("WorkingDir") or "/"
        if config.get("User") != f"{UID}:{UID}":
            raise SmokeError(f"{image}: USER is {config.get('User')!r}, expected {UID}:{UID}")
        self.ctr = sh(["buildah", "from", "--pull-never", image]).strip()
        self.root = Path(sh(["buildah", "mount", self.ctr]).strip())
        for point in ("work", "mnt/models", "var/cache/deepmedix"):  # mount points, as a runtime makes them
            (self.root / point).mkdir(parents=True, exist_ok=True)

    def argv(self, cmd: list[str], binds: list[tuple[str, str, bool]], env: dict[str, str],
             tmpfs: tuple[str, ...] = ()) -> list[str]:
        out = ["bwrap", "--ro-bind", str(self.root), "/", "--proc", "/proc", "--dev", "/dev",
               "--perms", "1777", "--tmpfs", "/dev/shm", "--perms", "1777", "--tmpfs", "/tmp",
               "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--clearenv",
               "--chdir", self.workdir]
        for path in tmpfs:
            out += ["--perms", "1777", "--tmpfs", path]
        for src, dst, writable in binds:
            out += ["--bind" if writable else "--ro-bind", src, dst]
        for k, v in {**self.env, **env}.items():
            out += ["--setenv", k, v]
        return out + ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all",
                      "--bounding-set=-all", "--no-new-privs", "--", *cmd]

    def run(self, cmd: list[str], binds=(), env=None, tmpfs=(), timeout=1800, expect=0) -> str:
        proc = subprocess.run(self.argv(cmd, list(binds), env or {}, tmpfs), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != expect and not (expect == "non-zero" and proc.returncode != 0):
            raise SmokeError(f"{self.image}: {' '.join(cmd)}: exit {proc.returncode} (expected {expect})\n"
                             f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        return proc.stdout + proc.stderr

    def start(self, cmd: list[str], binds=(), env=None, tmpfs=(), log=None) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd, list(binds), env or {}, tmpfs), stdout=log, stderr=subprocess.STDOUT)

    def close(self):
        subprocess.run(["buildah", "umount", self.ctr], capture_output=True)
        subprocess.run(["buildah", "rm", self.ctr], capture_output=True)


PROBE = """
import errno, os, sys
assert os.getuid() == 1000 and os.getgid() == 1000, (os.getuid(), os.getgid())
for path in ("/smoke", os.path.join(os.getcwd(), "smoke"), os.path.expanduser("~/smoke")):
    try:
        open(path, "w")
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES), (path, exc)
    else:
        sys.exit(f"{path}: the root filesystem is writable")
open("/tmp/smoke", "w").write("ok")
print("uid 1000, read-only root, writable /tmp")
"""


def ordinary_modes(folder: Path) -> None:
    """Every file written 0644 (0755 if executable) and every folder 0755: readable by any uid."""
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        if p.is_dir() and mode != 0o755 or p.is_file() and mode not in (0o644, 0o755):
            raise SmokeError(f"{p}: mode {mode:04o}; artifacts must be readable by any uid (0644 / 0755)")


def smoke_data(c: Container, work: Path) -> str:
    c.run(["python", "-c", PROBE])
    binds = [(str(work), "/work", True)]
    c.run(["deepmedix", "data", "phantom", "--out", "/work/phantom", "--n", "4"], binds=binds)
    c.run(["deepmedix", "curate", "--out", "/work/data", "-s", "n_patients=6", "-s", "vqa_per_study=2",
           "--workers", "1"], binds=binds)
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    if not manifest.get("total"):
        raise SmokeError(f"data: curate wrote no records ({manifest})")
    phantom = [p for p in (work / "phantom").rglob("*") if p.is_file()]
    if not phantom:
        raise SmokeError("data: deepmedix data phantom wrote nothing")
    ordinary_modes(work / "data")
    ordinary_modes(work / "phantom")
    probe = "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    torch = _line(c.run(["python", "-c", probe]), "torch ")
    return f"{manifest['total']} records; {torch}"


TRAIN_IMPORTS = """
import torch, transformers, trl, deepspeed, peft
assert torch.version.cuda and torch.version.cuda.startswith("13."), torch.version.cuda
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "trl", trl.__version__, "deepspeed", deepspeed.__version__, "peft", peft.__version__)
"""

# The JIT path DeepSpeed's ops take (torch.utils.cpp_extension, ninja, nvcc, g++, cudart), built for an H100
# (sm_90) without a GPU; the module then imports (loading CUDA code needs no device until a kernel runs).
TRAIN_JIT = """
import os, torch
from torch.utils.cpp_extension import load_inline
cuda = '''
__global__ void twice(float* x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= 2; }
void launch(torch::Tensor x) { twice<<<(x.numel() + 255) / 256, 256>>>(x.data_ptr<float>(), x.numel()); }
'''
mod = load_inline("smoke_twice", cpp_sources="void launch(torch::Tensor x);", cuda_sources=cuda,
                  functions=["launch"], build_directory=os.environ["BUILD"], verbose=False)
print("nvcc built and loaded", mod.__name__, "for", os.environ["TORCH_CUDA_ARCH_LIST"])
"""


def _line(output: str, prefix: str) -> str:
    found = [ln for ln in output.splitlines() if ln.startswith(prefix)]
    if not found:
        raise SmokeError(f"no line starting {prefix!r} in:\n{output[-2000:]}")
    return found[-1]


def smoke_train(c: Container, work: Path) -> str:
    c.run(["python", "-c", PROBE])
    versions = _line(c.run(["python", "-c", TRAIN_IMPORTS]), "torch ")
    nvcc = _line(c.run(["nvcc", "--version"]), "Cuda compilation tools")
    jit = _line(c.run(["sh", "-c", "mkdir -p /tmp/ext && exec python -c \"$0\"", TRAIN_JIT],
                      env={"BUILD": "/tmp/ext", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "2"}), "nvcc built")
    binds = [(str(work), "/work", True)]
    env = {"HF_HOME": "/tmp/hf", "XDG_CACHE_HOME": "/tmp/cache", "DEEPMEDIX_CACHE": "/tmp/deepmedix"}
    c.run(["deepmedix", "model", "tiny", "--out", "/work/model", "--data", "/work/data"], binds=binds, env=env)
    c.run(["deepmedix", "train", "sft", "--data", "/work/data", "--model", "/work/model", "--out", "/work/sft",
           "-s", "max_steps=2"], binds=binds, env=env)
    metrics = json.loads((work / "sft" / "metrics.json").read_text())
    if metrics.get("steps") != 2:
        raise SmokeError(f"train: SFT ran {metrics.get('steps')} steps, not 2 ({metrics})")
    ordinary_modes(work / "model")
    ordinary_modes(work / "sft")
    return (f"{versions}; {nvcc}; {jit}; SFT 2 steps, loss {metrics['before']:.3f} -> {metrics['after']:.3f} "
            f"(val)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (localhost)
        return resp.read()


def _post(url: str, payload: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (localhost)
        return json.loads(resp.read())


SERVE_ENV = {"HF_HOME": "/var/cache/deepmedix/huggingface", "XDG_CACHE_HOME": "/var/cache/deepmedix"}


def smoke_serving(c: Container, work: Path) -> str:
    from openai import OpenAI

    c.run(["python", "-c", PROBE])
    model = work / "sft"
    image = next((work / "data").rglob("*.png"))
    port = free_port()
    log_path = work / "serving.log"
    with log_path.open("w") as log:
        proc = c.start(["deepmedix", "serve", "--model", "/mnt/models", "--host", "127.0.0.1", "--port", str(port)],
                       binds=[(str(model), "/mnt/models", False), (str(image), "/tmp/probe.png", False)],
                       env=SERVE_ENV, tmpfs=("/var/cache/deepmedix",), log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SmokeError(f"serving: the server exited {proc.returncode}\n{log_path.read_text()[-4000:]}")
            try:
                _get(f"{base}/v1/models/deepmedix")
                break
            except OSError:
                if time.time() > deadline:
                    raise SmokeError(f"serving: not ready in 600 s\n{log_path.read_text()[-4000:]}") from None
                time.sleep(1)
        b64 = base64.b64encode(image.read_bytes()).decode()
        v1 = _post(f"{base}/v1/models/deepmedix:predict",
                   {"instances": [{"image": b64, "question": "Where is the abnormality?"}]})
        pred = v1["predictions"][0]
        if "text" not in pred or "grounding" not in pred:
            raise SmokeError(f"serving: v1 answer without text or grounding: {pred}")
        client = OpenAI(base_url=f"{base}/openai/v1", api_key="none", timeout=600)
        chat = client.chat.completions.create(model="deepmedix", max_tokens=16, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
            {"type": "text", "text": "Is there a pleural effusion?"}]}])
        if not chat.choices or chat.choices[0].message.content is None:
            raise SmokeError(f"serving: OpenAI route answered {chat}")
        metrics = _get(f"{base}/metrics").decode()
        for route in ("v1_predict", "openai_chat"):  # serving/prometheus.py's route labels
            if not re.search(rf'^deepmedix_requests_total\{{[^}}]*route="{route}"[^}}]*\}} [1-9]', metrics, re.M):
                raise SmokeError(f"serving: /metrics does not count the {route} request:\n{metrics[:1500]}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # a model folder another uid cannot read: the server names the file, the uid and "permission denied"
    locked = work / "locked-model"
    shutil.copytree(model, locked)
    os.chown(locked / "model.safetensors", 0, 0)
    os.chmod(locked / "model.safetensors", 0o600)
    out = c.run(["deepmedix", "serve", "--model", "/mnt/models", "--port", str(free_port())],
                binds=[(str(locked), "/mnt/models", False)], env=SERVE_ENV, tmpfs=("/var/cache/deepmedix",),
                expect="non-zero", timeout=600)
    if not ("permission denied" in out and "/mnt/models/model.safetensors" in out and "uid 1000" in out):
        raise SmokeError(f"serving: an unreadable model file was not reported as permission denied:\n{out[-2000:]}")
    return "v1, OpenAI route and /metrics answered; a root-owned 0600 model file: permission denied for uid 1000"


def size(image: str) -> str:
    return sh(["buildah", "images", "--format", "{{.Size}}", image]).strip().splitlines()[0]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="use the images already built")
    parser.add_argument("--images", default="data train serving")
    parser.add_argument("--registry", default=os.environ.get("REGISTRY", "localhost/deepmedix"))
    parser.add_argument("--version", default=os.environ.get("VERSION", ""))
    args = parser.parse_args(argv)
    version = args.version or tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    names = args.images.split()
    tags = {n: f"{args.registry}/deepmedix-{n}:{version}" for n in names}
    canary = f"deepmedix-canary-{secrets.token_hex(12)}"
    built: dict[str, float] = {}
    if not args.no_build:
        for name in names:
            t0 = time.time()
            env = {**os.environ, "ENGINE": "buildah", "IMAGES": name, "REGISTRY": args.registry, "VERSION": version,
                   "DEEPMEDIX_SECRETS_CANARY": canary}
            if subprocess.run(["bash", str(ROOT / "images" / "build.sh")], env=env).returncode != 0:
                print(f"image {name}: FAILED (the build)", flush=True)
                return 1
            built[name] = time.time() - t0
            if os.environ.get("BASE") == "debian":  # made once, by the first build; the others start from it
                os.environ["BASE"] = os.environ.get("DEBIAN_BASE_TAG", "localhost/deepmedix-python:3.11-bookworm")
    work = Path(tempfile.mkdtemp(prefix="deepmedix-smoke-"))
    os.chmod(work, 0o777)  # the volume the uid-1000 containers write to
    failed = False
    order = [n for n in ("data", "train", "serving") if n in names]
    checks = {"data": smoke_data, "train": smoke_train, "serving": smoke_serving}
    try:
        for name in order:
            t0 = time.time()
            c = Container(tags[name])
            try:
                detail = checks[name](c, work)
            except (SmokeError, subprocess.TimeoutExpired, OSError) as exc:
                print(f"image {name}: FAILED: {exc}", flush=True)
                failed = True
                break
            finally:
                c.close()
            took = f"built in {built[name]:.0f} s, " if name in built else ""
            print(f"image {name}: ok ({size(tags[name])}; {took}smoke {time.time() - t0:.0f} s) — {detail}",
                  flush=True)
        if not failed:
            proc = subprocess.run([sys.executable, str(ROOT / "images" / "layers.py"), *tags.values(),
                                   "--canary", canary])
            failed = proc.returncode != 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
