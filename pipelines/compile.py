"""``make compile``: write the pipeline IR YAML (reproducible; a test checks the checked-in file is current)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import re
from pathlib import Path

from kfp import compiler

from pipelines.deepmedix_pipeline import deepmedix_pipeline

DEFAULT_OUT = Path(__file__).resolve().parent / "deepmedix_pipeline.yaml"


_DEFAULT_RE = re.compile(r"^(#\s+\w+: \w+ \[Default: )(.*)(\])$")


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _stable_header(text: str) -> str:
    """KFP's header comment prints dict defaults in protobuf map order, which changes from run to run; print
    them with sorted keys so the file is reproducible."""
    lines = []
    for line in text.splitlines(keepends=True):
        m = _DEFAULT_RE.match(line.rstrip("\n"))
        if m:
            try:
                line = f"{m.group(1)}{_sorted(ast.literal_eval(m.group(2)))}{m.group(3)}\n"
            except (ValueError, SyntaxError):
                pass
        lines.append(line)
    return "".join(lines)


@contextlib.contextmanager
def _plain_yaml_strings():
    """PyYAML's own string style while KFP writes the file: an imported library (hera) may have swapped in a
    global str representer (block style for multi-line strings), which would change the IR's text."""
    import yaml

    plain = yaml.representer.SafeRepresenter.represent_str
    classes = [c for c in (yaml.representer.SafeRepresenter, yaml.representer.Representer, yaml.SafeDumper,
                           yaml.Dumper, getattr(yaml, "CSafeDumper", None), getattr(yaml, "CDumper", None)) if c]
    saved = [(c, c.__dict__["yaml_representers"][str]) for c in classes
             if str in c.__dict__.get("yaml_representers", {})]
    for c, _ in saved:
        c.yaml_representers[str] = plain
    try:
        yield
    finally:
        for c, rep in saved:
            c.yaml_representers[str] = rep


def compile_pipeline(out: str | Path = DEFAULT_OUT, size: str = "") -> Path:
    """Write the IR to ``out``. With ``size``, every stage's ``configs/<stage>/<size>.yaml`` is resolved first (a
    missing or broken one fails here, not in a pod hours into the run) and becomes the pipeline's default ``size``
    (KFP's ``pipeline_parameters`` override the function's defaults)."""
    from deepmedix.config import load_size

    out = Path(out)
    params = None
    if size:
        load_size(size)
        params = {"size": size}
    with _plain_yaml_strings():
        compiler.Compiler().compile(deepmedix_pipeline, package_path=str(out), pipeline_parameters=params)
    out.write_text(_stable_header(out.read_text()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--size", default="", help="resolve every stage's configs/<stage>/SIZE.yaml; the default size")
    args = ap.parse_args(argv)
    print(compile_pipeline(args.out, args.size))


if __name__ == "__main__":
    main()
