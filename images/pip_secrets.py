"""Write the host's pip settings as build secrets for the images (``images/build.sh`` runs this).

    python3 images/pip_secrets.py OUT_DIR [--no-local]

Reads pip's configuration the way pip does for ``pip install`` (the global files, the user files, the virtualenv's
file, ``PIP_CONFIG_FILE``; ``[global]`` then ``[install]``; then ``PIP_*`` variables) and writes, mode 0600:

* ``OUT_DIR/pip.conf``: ``[global]`` with only what reaching a package index needs: ``index-url``,
  ``extra-index-url``, ``find-links``, ``trusted-host``, ``proxy``, ``timeout``, ``retries``, ``no-index``, and
  ``cert = /run/secrets/ca.crt`` when the host has a CA bundle. Credentials in an index URL stay in this file, which
  the Dockerfiles mount for one command (``RUN --mount=type=secret,id=pip.conf``) and which no layer keeps.
* ``OUT_DIR/ca.crt``: the CA bundle pip uses on the host (its ``cert``, else ``REQUESTS_CA_BUNDLE``,
  ``CURL_CA_BUNDLE``, ``SSL_CERT_FILE``); empty when there is none.

``DEEPMEDIX_SECRETS_CANARY``, when set, is written as a comment line at the top of both files (pip and OpenSSL skip
it): ``images/layers.py --canary`` then finds any copy of either secret in an image's layers.

Local locations (``file://`` indexes, find-links folders) are printed one a line on stdout: the build mounts each
read-only at the same path (an index with the folder above it, where its pages link to their files), with buildah
and podman ``--volume``. ``--no-local`` (docker, which cannot mount a folder into a build) leaves them out of
``pip.conf`` and says so on stderr. What is left out besides (``constraint``, the host's own files;
``client-cert``) is named on stderr too. Standard library only.
"""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

LISTS = ("extra-index-url", "find-links", "trusted-host")
SINGLE = ("index-url", "proxy", "timeout", "retries", "no-index", "cert")
ALIASES = {"default-timeout": "timeout"}
IGNORED = ("constraint", "requirement", "client-cert")
SECRET_CA = "/run/secrets/ca.crt"


def config_files(env: dict[str, str], etc: Path = Path("/etc")) -> list[Path]:
    """pip's files in the order it loads them (later ones win): global, user, site, PIP_CONFIG_FILE."""
    home = Path(env.get("HOME", str(Path.home())))
    xdg_dirs = [d for d in env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep) if d]
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs] + [etc / "pip.conf"]
    files += [home / ".pip" / "pip.conf", Path(env.get("XDG_CONFIG_HOME", str(home / ".config"))) / "pip" / "pip.conf"]
    if env.get("VIRTUAL_ENV"):
        files.append(Path(env["VIRTUAL_ENV"]) / "pip.conf")
    if env.get("PIP_CONFIG_FILE") and env["PIP_CONFIG_FILE"] != os.devnull:
        files.append(Path(env["PIP_CONFIG_FILE"]))
    return files


def _key(name: str) -> str:
    name = name.strip().lower().replace("_", "-")
    return ALIASES.get(name, name)


def settings(env: dict[str, str], etc: Path = Path("/etc")) -> tuple[dict[str, str], list[str]]:
    """The effective values (lists as whitespace-separated strings) and what was read, for ``pip install``: as pip
    does, every file's ``[global]`` first, then every file's ``[install]`` (later files win within a section),
    then ``PIP_*`` variables. ``PIP_CONFIG_FILE=/dev/null`` means no file at all."""
    sections: dict[str, dict[str, str]] = {"global": {}, "install": {}}
    read: list[str] = []
    files = [] if env.get("PIP_CONFIG_FILE") == os.devnull else config_files(env, etc)
    for path in files:
        if not path.is_file():
            continue
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise SystemExit(f"images/pip_secrets.py: {path}: not a pip configuration file ({exc})") from exc
        read.append(str(path))
        for section, into in sections.items():
            if parser.has_section(section):
                into.update({_key(name): value for name, value in parser.items(section)})
    values = {**sections["global"], **sections["install"]}
    for name, value in env.items():
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE":
            values[_key(name[4:])] = value
    return values, read


def _local_path(location: str) -> str | None:
    """The folder a location names on this machine (a path or file:// URL), else None (a remote URL)."""
    parts = urlsplit(location)
    if parts.scheme == "file":
        return parts.path
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return location
    return None


def ca_bundle(values: dict[str, str], env: dict[str, str]) -> Path | None:
    for candidate in (values.get("cert"), env.get("REQUESTS_CA_BUNDLE"), env.get("CURL_CA_BUNDLE"),
                      env.get("SSL_CERT_FILE")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def write(out: Path, env: dict[str, str], local: bool = True, etc: Path = Path("/etc")) -> list[str]:
    """Write ``pip.conf`` and ``ca.crt`` into ``out``; return the local folders the build must mount. ``etc``: where
    the system-wide ``pip.conf`` lies (a test's own folder)."""
    values, _read = settings(env, etc)
    notes: list[str] = []
    mounts: list[str] = []
    lines = ["[global]"]
    for name in ("index-url", *LISTS):
        if name not in values:
            continue
        kept = []
        for item in values[name].split() if name in LISTS else [values[name].strip()]:
            path = _local_path(item) if name != "trusted-host" else None
            if path is None:
                kept.append(item)
            elif not local:
                notes.append(f"{name} {item}: a local folder, which this engine cannot mount into a build; left out")
            elif not Path(path).exists():
                notes.append(f"{name} {item}: no such folder on this machine; left out")
            else:
                kept.append(item)
                # an index's pages link to its files beside it (simple/ next to files/ or packages/): the parent
                folder = Path(path).resolve().parent if name.endswith("index-url") else Path(path).resolve()
                mounts.append(str(folder))
        if kept:
            lines.append(f"{name} = {' '.join(kept)}")
    for name in ("proxy", "timeout", "retries", "no-index"):
        if values.get(name):
            lines.append(f"{name} = {values[name]}")
    ca = ca_bundle(values, env)
    if ca is not None:
        lines.append(f"cert = {SECRET_CA}")
    for name in IGNORED:
        if values.get(name):
            notes.append(f"{name}: a file of the host's own; not passed to the build")
    canary = env.get("DEEPMEDIX_SECRETS_CANARY", "")
    head = f"# {canary}\n".encode() if canary else b""
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("pip.conf", head + ("\n".join(lines) + "\n").encode()),
                       ("ca.crt", head + ca.read_bytes() if ca is not None else head)):
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    for note in notes:
        print(f"images/pip_secrets.py: {note}", file=sys.stderr)
    return list(dict.fromkeys(mounts))


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--no-local"]
    if len(args) != 1:
        print("usage: python3 images/pip_secrets.py OUT_DIR [--no-local]", file=sys.stderr)
        return 2
    for mount in write(Path(args[0]), dict(os.environ), local="--no-local" not in argv):
        print(mount)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
