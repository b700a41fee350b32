"""The layer contract (``[tool.importlinter]`` in pyproject.toml, run by ``make test`` as ``lint-imports``) holds, and
it fails, naming the import, when a module imports upwards or a torch-free layer imports torch: checked on a copy
of the packages with such an import added. Every module stays under 500 lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("deepmedix", "serving", "pipelines", "components")
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture()
def tree(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def lint(where: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory first on sys.path, so it reads the copy, not the installed tree
    return subprocess.run([str(LINT), "--no-cache"], cwd=where, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_layers():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract_and_is_named(tree):
    assert lint(tree).returncode == 0
    paper = tree / "deepmedix" / "rewards" / "paper.py"
    paper.write_text(paper.read_text() + "\nfrom deepmedix.train import common  # noqa: E402,F401\n")
    r = lint(tree)
    assert r.returncode == 1
    assert "deepmedix.rewards.paper -> deepmedix.train.common" in r.stdout, r.stdout
    # the library importing a deployable is one too
    paper.write_text(paper.read_text().replace("from deepmedix.train import common", "from serving import prometheus"))
    r = lint(tree)
    assert r.returncode == 1 and "deepmedix.rewards.paper -> serving.prometheus" in r.stdout, r.stdout


def test_a_new_library_module_that_imports_a_deployable_breaks_the_contract(tree):
    # in no layer of its own: the forbidden contract over the whole package catches it
    (tree / "deepmedix" / "helpers.py").write_text("from pipelines import demo  # noqa: F401\n")
    r = lint(tree)
    assert r.returncode == 1 and "deepmedix.helpers -> pipelines.demo" in r.stdout, r.stdout


def test_torch_in_the_llm_client_breaks_the_torch_free_contract(tree):
    client = tree / "deepmedix" / "llm" / "client.py"
    client.write_text(client.read_text() + "\nimport torch  # noqa: E402,F401\n")
    r = lint(tree)
    assert r.returncode == 1 and "deepmedix.llm.client -> torch" in r.stdout, r.stdout


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
