"""``make compile``: write the pipeline IR YAML (reproducible; a test checks the checked-in file is current)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.deepmedix_pipeline import deepmedix_pipeline

DEFAULT_OUT = Path(__file__).resolve().parent / "deepmedix_pipeline.yaml"


def compile_pipeline(out: str | Path = DEFAULT_OUT) -> Path:
    out = Path(out)
    compiler.Compiler().compile(deepmedix_pipeline, package_path=str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    print(compile_pipeline(args.out))


if __name__ == "__main__":
    main()
