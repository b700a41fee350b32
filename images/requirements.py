"""Print the project's requirements (its dependencies plus the named extras) one a line, read from pyproject.toml.

The images install these first, in a layer of their own, so that a change to the source alone reuses it:

    python images/requirements.py eval pipeline > /tmp/requirements.txt
    pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt

Standard library only (it runs before anything is installed). An unknown extra is an error (exit 2).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise KeyError(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    out: list[str] = []
    for req in project["dependencies"] + [r for e in extras for r in optional[e]]:
        if req.startswith(f"{project['name']}["):  # a self-reference such as deepmedix[train,eval]
            raise KeyError(f"{req!r}: name the extras it groups instead")
        if req not in out:
            out.append(req)
    return out


def main(argv: list[str]) -> int:
    try:
        print("\n".join(requirements(argv)))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
