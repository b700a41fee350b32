"""``images/pip_secrets.py``: the host's pip settings, as pip reads them for ``pip install``, written as the two
build secrets the Dockerfiles mount (issue 23). Each test gives it a whole environment of its own (HOME, XDG dirs,
PIP_* variables), so the machine's own pip configuration plays no part."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "images"))
import pip_secrets  # noqa: E402

sys.path.remove(str(ROOT / "images"))


@pytest.fixture()
def host(tmp_path):
    """An isolated host: its own HOME and global config folder."""
    (tmp_path / "home").mkdir()
    (tmp_path / "xdg" / "pip").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_DIRS": str(tmp_path / "xdg")}


def write(out: Path, env: dict[str, str], **kw) -> list[str]:
    return pip_secrets.write(out, env, etc=Path(env["XDG_CONFIG_DIRS"]).parent / "etc", **kw)


def conf(out: Path) -> list[str]:
    return [ln for ln in (out / "pip.conf").read_text().splitlines() if not ln.startswith("#")]


def test_pips_precedence_install_section_env_and_only_what_reaches_an_index(tmp_path, host):
    (tmp_path / "xdg" / "pip" / "pip.conf").write_text(
        "[global]\nindex-url = https://global.example/simple\ntimeout = 10\nconstraint = /etc/c.txt\n"
        "disable-pip-version-check = true\n")
    user = Path(host["HOME"]) / ".config" / "pip"
    user.mkdir(parents=True)
    (user / "pip.conf").write_text("[global]\nindex_url = https://user.example/simple\n"
                                   "[install]\ntrusted-host = user.example\n")
    env = {**host, "PIP_RETRIES": "7", "PIP_EXTRA_INDEX_URL": "https://a.example/simple https://b.example/simple"}
    mounts = write(tmp_path / "out", env)
    assert mounts == []
    assert conf(tmp_path / "out") == [
        "[global]", "index-url = https://user.example/simple",
        "extra-index-url = https://a.example/simple https://b.example/simple", "trusted-host = user.example",
        "timeout = 10", "retries = 7"]
    for name in ("pip.conf", "ca.crt"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o600


def test_credentials_and_ca_go_to_the_secret_files_only(tmp_path, host, capfd):
    ca = tmp_path / "corp-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    cfg = tmp_path / "pip.conf"
    cfg.write_text(f"[global]\nindex-url = https://u:s3cret@mirror.example/simple\ncert = {ca}\n"
                   "client-cert = /home/me/client.pem\n")
    env = {**host, "PIP_CONFIG_FILE": str(cfg), "DEEPMEDIX_SECRETS_CANARY": "canary-42"}
    proc = subprocess.run([sys.executable, str(ROOT / "images" / "pip_secrets.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # no local folders to mount; the credentials are never printed
    assert "s3cret" not in proc.stderr and "client-cert: a file of the host's own" in proc.stderr
    assert "/home/me" not in proc.stderr
    text = (tmp_path / "out" / "pip.conf").read_text()
    assert text.startswith("# canary-42\n")
    assert conf(tmp_path / "out") == ["[global]", "index-url = https://u:s3cret@mirror.example/simple",
                                      "cert = /run/secrets/ca.crt"]
    assert (tmp_path / "out" / "ca.crt").read_text() == "# canary-42\n" + ca.read_text()


def test_install_section_of_any_file_beats_global_and_dev_null_reads_no_file(tmp_path, host):
    """pip: all ``[global]`` values, then all ``[install]`` values, whichever file; ``PIP_CONFIG_FILE=/dev/null``
    skips every file (env variables still count)."""
    (tmp_path / "xdg" / "pip" / "pip.conf").write_text("[install]\nindex-url = https://from-install.example/simple\n")
    user = Path(host["HOME"]) / ".pip"
    user.mkdir()
    (user / "pip.conf").write_text("[global]\nindex-url = https://later-global.example/simple\n")
    write(tmp_path / "out", host)
    assert conf(tmp_path / "out") == ["[global]", "index-url = https://from-install.example/simple"]
    write(tmp_path / "none", {**host, "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "2"})
    assert conf(tmp_path / "none") == ["[global]", "retries = 2"]


def test_ca_bundle_from_the_environment_when_pip_names_none(tmp_path, host):
    ca = tmp_path / "bundle.crt"
    ca.write_text("bundle")
    write(tmp_path / "out", {**host, "REQUESTS_CA_BUNDLE": str(ca)})
    assert conf(tmp_path / "out") == ["[global]", "cert = /run/secrets/ca.crt"]
    assert (tmp_path / "out" / "ca.crt").read_text() == "bundle"
    write(tmp_path / "none", host)
    assert conf(tmp_path / "none") == ["[global]"] and (tmp_path / "none" / "ca.crt").read_bytes() == b""


def test_local_indexes_are_mounted_or_left_out(tmp_path, host, capfd):
    (tmp_path / "mirror" / "simple").mkdir(parents=True)
    (tmp_path / "wheels").mkdir()
    env = {**host, "PIP_EXTRA_INDEX_URL": f"file://{tmp_path}/mirror/simple https://pypi.example/simple",
           "PIP_FIND_LINKS": f"{tmp_path}/wheels {tmp_path}/gone"}
    mounts = write(tmp_path / "out", env)
    # the index's pages link to files beside it: its parent is mounted
    assert mounts == [str(tmp_path / "mirror"), str(tmp_path / "wheels")]
    assert conf(tmp_path / "out")[1:] == [
        f"extra-index-url = file://{tmp_path}/mirror/simple https://pypi.example/simple",
        f"find-links = {tmp_path}/wheels"]
    assert "gone: no such folder" in capfd.readouterr().err
    assert write(tmp_path / "docker", env, local=False) == []
    assert conf(tmp_path / "docker")[1:] == ["extra-index-url = https://pypi.example/simple"]
    assert "cannot mount" in capfd.readouterr().err


def test_a_broken_config_file_is_named(tmp_path, host):
    bad = tmp_path / "pip.conf"
    bad.write_text("index-url = no section\n")
    with pytest.raises(SystemExit, match="pip.conf: not a pip configuration file"):
        write(tmp_path / "out", {**host, "PIP_CONFIG_FILE": str(bad)})
    proc = subprocess.run([sys.executable, str(ROOT / "images" / "pip_secrets.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
