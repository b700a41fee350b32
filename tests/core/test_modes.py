"""Artifacts any uid can read (issue 23): what the stages publish has ordinary modes, and a reader that cannot read
a file says "permission denied" with the path and its uid.

safetensors 0.8's ``save_file`` writes its file 0600 (measured here: the first test) and ``tempfile.mkdtemp``
makes folders 0700; a predictor pod runs as uid 1000 and the model folder may have been written by another uid.
The reader side runs as a real uid 1000 (``setpriv``, as root) or, as any other user, on a file it owns with mode
0000 (``os.access`` is what both go by).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepmedix import store
from deepmedix.errors import InputError


def modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_safetensors_writes_owner_only_and_atomic_dir_publishes_ordinary_modes(tmp_path):
    probe = tmp_path / "probe.safetensors"
    save_file({"w": torch.zeros(2)}, str(probe))
    assert probe.stat().st_mode & 0o077 == 0, "safetensors now writes readable files: the fix may be moot"
    umask = os.umask(0o022)
    try:
        with store.atomic_dir(tmp_path / "model") as out:
            save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
            (out / "sub").mkdir(mode=0o700)
            (out / "sub" / "run.sh").write_text("#!/bin/sh\n")
            (out / "sub" / "run.sh").chmod(0o700)
            (out / "config.json").write_text("{}")
    finally:
        os.umask(umask)
    assert modes(tmp_path / "model") == {".": 0o755, "model.safetensors": 0o644, "sub": 0o755,
                                         "sub/run.sh": 0o755, "config.json": 0o644}


def test_published_checkpoints_have_ordinary_modes(tmp_path):
    from deepmedix.train.checkpoints import publish_checkpoint

    src = tmp_path / "work" / "checkpoint-2"
    src.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(src / "model.safetensors"))
    src.chmod(0o700)
    umask = os.umask(0o022)
    try:
        publish_checkpoint(src, str(tmp_path / "ckpts"), keep=2, info={"step": 2, "run": "r"})
    finally:
        os.umask(umask)
    got = modes(tmp_path / "ckpts" / "checkpoint-2")
    assert got["."] == 0o755 and got["model.safetensors"] == 0o644 and got["lineage.json"] == 0o644


def _as_reader(code: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``code`` as a uid that cannot read the locked file: uid 1000 when we are root, else ourselves."""
    cmd = [sys.executable, "-c", code, str(folder)]
    if os.getuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("running as root without setpriv (util-linux): cannot drop to uid 1000")
        cmd = [setpriv, "--reuid=1000", "--regid=1000", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DEEPMEDIX_CACHE": str(folder.parent / "cache")})


@pytest.fixture()
def locked_model(taught_model):
    """A copy of a real model folder, in a world-readable place, with its weights unreadable to the reader."""
    base = Path(tempfile.mkdtemp(prefix="deepmedix-modes-"))
    base.chmod(0o755)
    folder = base / "model"
    shutil.copytree(taught_model, folder)
    store.ordinary_modes(folder)
    (folder / "model.safetensors").chmod(0o600 if os.getuid() == 0 else 0o000)
    yield folder
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def taught_model(tmp_path_factory):
    from deepmedix.model.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(out, texts=["no acute cardiopulmonary process"] * 4)
    return out


def _failure(call: str, folder: Path) -> str:
    """What ``call`` (on ``folder``, as the reader) raises: "ErrorType message"."""
    code = ("import sys; from pathlib import Path; from deepmedix import store; from deepmedix.model.load import load\n"
            f"try:\n    {call}\nexcept Exception as exc:\n    print(type(exc).__name__, exc); sys.exit(3)\n")
    proc = _as_reader(code, folder)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    return proc.stdout


def test_check_readable_names_the_file_and_the_uid(locked_model):
    uid = 1000 if os.getuid() == 0 else os.getuid()
    assert f"InputError {locked_model / 'model.safetensors'}: permission denied for uid {uid}" in \
        _failure("store.check_readable(Path(sys.argv[1]))", locked_model)


def test_a_model_the_server_cannot_read_is_permission_denied_not_missing(locked_model):
    """The CLI's model loading (``deepmedix serve`` loads through it) fails with the cause, not "no such file"."""
    out = _failure("load(sys.argv[1], device='cpu')", locked_model)
    assert out.startswith("ModelLoadError ") and "permission denied for uid" in out
    assert "model.safetensors" in out and "No such file" not in out


def test_a_broken_link_in_a_model_folder_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(InputError, match=r"model\.safetensors: a broken symbolic link \(to .*gone\.safetensors\)"):
        store.check_readable(tmp_path / "model")


def test_an_unreadable_folder_is_named_not_empty():
    base = Path(tempfile.mkdtemp(prefix="deepmedix-modes-"))
    try:
        base.chmod(0o755)
        folder = base / "data"
        (folder / "inner").mkdir(parents=True)
        (folder / "inner" / "a.json").write_text("{}")
        store.ordinary_modes(folder)
        store.check_readable(folder)  # readable: no error
        (folder / "inner").chmod(0o700 if os.getuid() == 0 else 0o000)
        assert f"{folder / 'inner'}: permission denied for uid" in \
            _failure("store.check_readable(Path(sys.argv[1]))", folder)
    finally:
        (base / "data" / "inner").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
