"""Build secrets stay out of images, and ``images/layers.py`` finds them when they do not (issue 23).

Real builds with buildah (Debian's, daemonless: chroot isolation), on a base image made here from Debian's static
busybox (``buildah from scratch``), with the secrets ``images/pip_secrets.py`` writes (a canary line in each, an
index URL with credentials, a CA bundle). The Dockerfiles' way (``RUN --mount=type=secret,id=pip.conf
--mount=type=secret,id=ca.crt``, ``PIP_CONFIG_FILE=/run/secrets/pip.conf`` for one command) leaves nothing in the
layers, the history or the configuration; the usual mistakes (a secret copied into a layer, pip settings in ENV, a
pip.conf in the build context COPY'd in) are each reported. ``make images-smoke`` runs the same check on the three
real images.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "images"))
import pip_secrets  # noqa: E402

sys.path.remove(str(ROOT / "images"))

BUILDAH = shutil.which("buildah")
BUSYBOX = "/bin/busybox"  # Debian's busybox-static (make test installs it with buildah)
pytestmark = pytest.mark.skipif(BUILDAH is None or not os.path.exists(BUSYBOX),
                                reason="buildah and busybox-static (make test installs both from Debian)")
ENV = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
if BUILDAH and subprocess.run([BUILDAH, "info"], capture_output=True, env=ENV).returncode != 0:
    ENV["STORAGE_DRIVER"] = "vfs"  # as images/build.sh does where overlay does not work


def buildah(*args: str) -> str:
    proc = subprocess.run([BUILDAH, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, f"buildah {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rootfs")
    for d in ("bin", "etc", "tmp", "root"):
        (root / d).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "cat", "cp", "mkdir", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    tag = f"localhost/deepmedix-test-busybox:{secrets.token_hex(4)}"
    ctr = buildah("from", "scratch")
    buildah("add", ctr, str(root), "/")
    buildah("config", "--env", "PATH=/bin", ctr)
    buildah("commit", "--quiet", ctr, tag)
    buildah("rm", ctr)
    yield tag
    subprocess.run([BUILDAH, "rmi", "--force", tag], capture_output=True, env=ENV)


@pytest.fixture()
def build(tmp_path, base):
    """Write the secrets, build a Dockerfile body on the busybox base with them, yield the tag; clean up."""
    canary = f"deepmedix-canary-{secrets.token_hex(8)}"
    ca = tmp_path / "corp.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n")
    conf = tmp_path / "host-pip.conf"
    conf.write_text(f"[global]\nindex-url = https://builder:tok3n@mirror.example/simple\ncert = {ca}\n")
    (tmp_path / "etc").mkdir()
    pip_secrets.write(tmp_path / "secrets", {"HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "xdg"),
                                             "PIP_CONFIG_FILE": str(conf), "DEEPMEDIX_SECRETS_CANARY": canary},
                      etc=tmp_path / "etc")
    tags = []

    def run(body: str) -> tuple[str, str]:
        ctx = tmp_path / f"ctx{len(tags)}"
        ctx.mkdir()
        shutil.copy(tmp_path / "secrets" / "pip.conf", ctx / "pip.conf")  # a mistake waiting to be COPY'd
        (ctx / "Dockerfile").write_text(f"FROM {base}\n{body}")
        tag = f"localhost/deepmedix-test-layers:{secrets.token_hex(4)}"
        buildah("bud", "--layers", "--tag", tag, "--secret", f"id=pip.conf,src={tmp_path / 'secrets' / 'pip.conf'}",
                "--secret", f"id=ca.crt,src={tmp_path / 'secrets' / 'ca.crt'}", str(ctx))
        tags.append(tag)
        return tag, canary

    yield run
    for tag in tags:
        subprocess.run([BUILDAH, "rmi", "--force", tag], capture_output=True, env=ENV)


def layers(tag: str, canary: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "images" / "layers.py"), tag, "--canary", canary],
                          capture_output=True, text=True, env=ENV, timeout=300)


def test_the_dockerfiles_way_leaves_no_secret(build):
    tag, canary = build(
        "RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \\\n"
        "    PIP_CONFIG_FILE=/run/secrets/pip.conf sh -c 'cat \"$PIP_CONFIG_FILE\" /run/secrets/ca.crt > /dev/null' "
        "&& true\n"
        "RUN mkdir -p /opt/app && cp /bin/busybox /opt/app/tool\n")
    proc = layers(tag, canary)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"layers {tag}: clean (") and "layers, " in proc.stdout


def test_the_checker_finds_each_way_a_secret_gets_baked_in(build):
    # the secret's bytes written out while reading it (under another name), ENV pip settings, a pip.conf COPY'd
    tag, canary = build(
        "RUN --mount=type=secret,id=pip.conf cp /run/secrets/pip.conf /etc/mirror.txt\n"
        "ENV PIP_INDEX_URL=https://builder:tok3n@mirror.example/simple\n"
        "COPY pip.conf /root/.config/pip/pip.conf\n")
    proc = layers(tag, canary)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = proc.stderr
    assert "etc/mirror.txt: holds the build secrets' canary" in found
    assert "etc/mirror.txt: an URL with credentials" in found
    assert "ENV PIP_INDEX_URL=" in found and "ENV PIP_INDEX_URL: a secret in the environment" in found
    assert "root/.config/pip/pip.conf: a pip configuration file" in found
    assert "history step" in found  # the ENV instruction carries the URL into the history too
    assert "tok3n" not in proc.stdout + proc.stderr and "https://***@mirror.example" in found  # named, not shown
