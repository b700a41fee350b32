"""The pins of the train image built with vLLM (``WITH_VLLM=1``): ``images/constraints-vllm.txt``.

Why a pin set of its own: TRL 1.16 takes ``vllm>=0.22.0,<=0.31.0`` (its ``vllm`` extra); vLLM 0.31.0 pins
``torch==2.13.0`` (the project's torch) and needs ``transformers>=5.10.4,<5.18.0``, while the CPU environment
(``constraints.txt``) has transformers 5.24.0. TRL's server mode does not avoid it: its ``VLLMClient``
(trl/generation/vllm_client.py) imports vLLM's NCCL weight-transfer engine in the trainer too. So the vLLM image
runs transformers 5.17.0, which the project allows (``transformers>=5.17,<6``) and which the suite is run against.

    python images/vllm_pins.py resolve   # let pip resolve the image's requirements + vLLM from the SEED pins and
                                         # write images/constraints-vllm.txt (needs the package index)
    python images/vllm_pins.py check     # pip install --dry-run of the same requirements under that file

Both exit non-zero when pip cannot resolve. Standard library only, like images/requirements.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "constraints-vllm.txt"
EXTRAS = ["train", "eval", "pipeline"]  # the train image's (images/train.Dockerfile)
VLLM = "vllm==0.31.0"
# What the resolution starts from: the project's torch, the one transformers that vLLM 0.31 and the project share
# the newest of, TRL 1.16, and the training stack as constraints.txt has it.
SEED = ["torch==2.13.0", "transformers==5.17.0", "trl==1.16.0", VLLM, "deepspeed==0.19.8", "peft==0.21.2",
        "kfp==2.17.3", "kfp-kubernetes==2.17.3"]


def requirements() -> list[str]:
    sys.path.insert(0, str(HERE))
    from requirements import requirements as reqs

    return reqs(EXTRAS) + [VLLM]


def dry_run(constraints: list[str], report: Path) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        c, r = Path(tmp) / "c.txt", Path(tmp) / "r.txt"
        c.write_text("\n".join(constraints) + "\n")
        r.write_text("\n".join(requirements()) + "\n")
        return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                               "--quiet", "--report", str(report), "-c", str(c), "-r", str(r)],
                              capture_output=True, text=True, check=False)


def pins(report: Path) -> list[str]:
    """``name==version`` of every package pip would install (names normalised as PEP 503 does, local labels such
    as ``+cpu`` dropped), sorted."""
    items = json.loads(report.read_text())["install"]
    return sorted(f"{re.sub(r'[-_.]+', '-', i['metadata']['name']).lower()}=={i['metadata']['version'].split('+')[0]}"
                  for i in items)


def main(argv: list[str]) -> int:
    if argv not in (["resolve"], ["check"]):
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        if argv == ["resolve"]:
            p = dry_run(SEED, report)
        else:
            p = dry_run([ln for ln in OUT.read_text().splitlines() if ln and not ln.startswith("#")], report)
        if p.returncode:
            print(p.stdout[-3000:] + p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        got = pins(report)
    if argv == ["resolve"]:
        OUT.write_text("# images/vllm_pins.py resolve: the train image with vLLM (WITH_VLLM=1); do not edit by hand\n"
                       + "\n".join(got) + "\n")
        print(f"{OUT}: {len(got)} pins")
    else:
        want = [ln for ln in OUT.read_text().splitlines() if ln and not ln.startswith("#")]
        key = [p for p in got if p.split("==")[0] in ("vllm", "transformers", "torch", "trl")]
        print(f"pip install --dry-run resolves the train image with {VLLM}: {len(got)} packages under "
              f"{len(want)} pins ({', '.join(key)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
