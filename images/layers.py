"""What a built image keeps of the build's secrets: nothing. ``make images-smoke`` runs this on the three images.

    python images/layers.py IMAGE... [--canary TEXT] [--engine buildah|podman|docker]

For each image it reads the image's history (every instruction's ``created_by``) and configuration (Env, Labels,
Cmd), and every file of every layer (``ENGINE save``/``push`` to an OCI or docker archive, each layer's tar read
whole), and fails on:

* a pip configuration file anywhere (``pip.conf``, ``pip.ini``), or a file left under ``run/secrets/``;
* an index URL with credentials (``scheme://user:password@host``) in the history, the configuration or a text file
  of pip's or the system's configuration folders (``etc/``, ``root/``, ``home/``);
* pip settings baked into the environment (``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``, ``PIP_CERT``,
  ``PIP_CONFIG_FILE``, ``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``, ``CURL_CA_BUNDLE``);
* ``--canary TEXT``: that text anywhere, in any file of any layer or in the history. ``images/build.sh`` writes
  ``DEEPMEDIX_SECRETS_CANARY`` into both secrets it passes (a comment line in ``pip.conf`` and in the CA bundle, which
  pip and OpenSSL ignore), so a copy of either secret in a layer, under any name, is found.

Exit 1 with one line per finding; 0 with one ``layers IMAGE: clean (N layers, M files)`` line per image.
Standard library only, besides the engine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@", re.I)
PIP_FILES = re.compile(r"(^|/)(pip\.conf|pip\.ini)$")
BAKED_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "PIP_CONFIG_FILE", "PIP_CLIENT_CERT",
             "PIP_TRUSTED_HOST", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")
CONFIG_DIRS = ("etc/", "root/", "home/")


def redact(text: str) -> str:
    """``scheme://user:password@`` -> ``scheme://***@``: findings name where a secret is, never print it."""
    return re.sub(r"([a-z][a-z0-9+.-]*://)[^/\s:@'\"]+:[^/\s@'\"]+@", r"\1***@", text, flags=re.I)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"images/layers.py: {' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def image_config(engine: str, image: str) -> tuple[list[str], dict]:
    """The history's ``created_by`` lines and the image configuration (Env, Labels, Cmd)."""
    if engine == "buildah":
        data = json.loads(_run(["buildah", "inspect", "--type", "image", image]))
        oci = data.get("OCIv1") or {}
        return [h.get("created_by", "") for h in oci.get("history", [])], oci.get("config", {})
    data = json.loads(_run([engine, "image", "inspect", image]))[0]
    lines = _run([engine, "image", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image]).splitlines()
    return lines, data.get("Config", {})


def layer_tars(engine: str, image: str, work: Path) -> list[Path]:
    """Each layer of the image as a tar file, lowest first (an OCI layout written by the engine)."""
    layout = work / "oci"
    if engine == "docker":
        archive = work / "image.tar"
        _run(["docker", "save", "-o", str(archive), image])
        with tarfile.open(archive) as tar:
            tar.extractall(layout, filter="data")
    else:
        cmd = ["buildah", "push"] if engine == "buildah" else ["podman", "push"]
        _run([*cmd, "--quiet", "--disable-compression", image, f"oci:{layout}"])
    if not (layout / "index.json").exists():  # a docker save from before Docker 25: manifest.json lists the tars
        return [layout / name for name in json.loads((layout / "manifest.json").read_text())[0]["Layers"]]
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads(_blob(layout, manifest_digest).read_text())
    if "layers" not in manifest:  # an index of manifests
        manifest = json.loads(_blob(layout, manifest["manifests"][0]["digest"]).read_text())
    return [_blob(layout, layer["digest"]) for layer in manifest["layers"]]


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algo / hexdigest


def scan_layer(path: Path, canary: str | None) -> tuple[list[str], int]:
    """Findings in one layer tar (gzip or not), and its number of files."""
    findings: list[str] = []
    needle = canary.encode() if canary else None
    files = 0
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if not member.isfile():
                continue
            files += 1
            if PIP_FILES.search(name):
                findings.append(f"{name}: a pip configuration file")
            if name.startswith("run/secrets/"):
                findings.append(f"{name}: a file left under run/secrets")
            scan_text = name.startswith(CONFIG_DIRS) and member.size < 1 << 20
            if needle is None and not scan_text:
                continue
            data = tar.extractfile(member).read()
            if needle is not None and needle in data:
                findings.append(f"{name}: holds the build secrets' canary (a copy of pip.conf or the CA bundle)")
            if scan_text and CREDENTIAL_URL.search(data.decode("utf-8", "replace")):
                findings.append(f"{name}: an URL with credentials")
    return findings, files


def check(engine: str, image: str, canary: str | None) -> tuple[list[str], str]:
    findings: list[str] = []
    history, config = image_config(engine, image)
    for n, line in enumerate(history):
        if CREDENTIAL_URL.search(line):
            findings.append(f"history step {n}: an URL with credentials: {redact(line)[:120]}")
        if canary and canary in line:
            findings.append(f"history step {n}: holds the build secrets' canary")
    for item in config.get("Env") or []:
        name, _, value = item.partition("=")
        if name in BAKED_ENV:
            findings.append(f"ENV {name}={redact(value)[:60]}: pip or TLS settings baked into the image")
        if CREDENTIAL_URL.search(value) or (canary and canary in value):
            findings.append(f"ENV {name}: a secret in the environment")
    blob = json.dumps(config.get("Labels") or {}) + json.dumps(config.get("Cmd") or [])
    if CREDENTIAL_URL.search(blob) or (canary and canary in blob):
        findings.append("labels or CMD: a secret in the configuration")
    with tempfile.TemporaryDirectory(prefix="deepmedix-layers-") as tmp:
        layers = layer_tars(engine, image, Path(tmp))
        total = 0
        for i, layer in enumerate(layers):
            found, files = scan_layer(layer, canary)
            total += files
            findings += [f"layer {i}: {f}" for f in found]
    return [f"{image}: {f}" for f in findings], f"layers {image}: clean ({len(layers)} layers, {total} files)"


def main(argv: list[str]) -> int:
    images, canary, engine = [], None, "buildah"
    it = iter(argv)
    for arg in it:
        if arg == "--canary":
            canary = next(it)
        elif arg == "--engine":
            engine = next(it)
        else:
            images.append(arg)
    if not images or engine not in ("buildah", "podman", "docker"):
        print("usage: python images/layers.py IMAGE... [--canary TEXT] [--engine buildah|podman|docker]",
              file=sys.stderr)
        return 2
    failed = False
    for image in images:
        findings, ok = check(engine, image, canary)
        for f in findings:
            print(f"layers {f}", file=sys.stderr)
        if findings:
            failed = True
        else:
            print(ok)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
