"""A GGUF file's header, read the quick way: its key/value pairs and its tensor table, each value read with struct
from a buffered file, array values skipped over unread.

gguf's own GGUFReader builds a numpy view for every part of every field: for SmolLM2-135M's 49,152-token vocabulary
that is 3.6 s per file, which preflight paid for every cell (43 s of a 12-cell sweep's start on the H100 node,
2026-12-06) and a gguf cell paid twice more (its tensor table, its file type). Layout (GGUF v2/v3, ggml's
docs/gguf.md): magic, version, tensor count, key/value count, the pairs (key string, value type, value), then per
tensor its name, dimensions, ggml type and data offset. Little-endian unless the version reads byte-swapped.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional

SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Header:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        (version,) = struct.unpack("<I", f.read(4))
        self.order = "<" if version & 0xFFFF else ">"  # a big-endian file's version reads byte-swapped
        self.version = version if self.order == "<" else struct.unpack(">I", struct.pack("<I", version))[0]
        if self.version < 2:
            raise ValueError(f"{path}: GGUF version {self.version} is not supported (2 and later)")
        self.n_tensors, self.n_kv = self.unpack("QQ")

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(self.order + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError(f"{self.path}: the GGUF header ends early")
        return struct.unpack(self.order + fmt, data)

    def string(self) -> str:
        (n,) = self.unpack("Q")
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[vtype])[0]
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.unpack("IQ")
            self.skip_array(etype, count)
            return None  # arrays (the tokenizer's vocabulary, merges, scores) are skipped: nothing here needs them
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in SCALAR_FORMATS:
            self.f.seek(count * struct.calcsize(SCALAR_FORMATS[etype]), 1)
        elif etype == STRING:
            for _ in range(count):
                (n,) = self.unpack("Q")
                self.f.seek(n, 1)
        elif etype == ARRAY:
            for _ in range(count):
                self.skip_array(*self.unpack("IQ"))
        else:
            raise ValueError(f"{self.path}: unknown GGUF array element type {etype}")


def read(path: Path, stop_at: Optional[str] = None, tensors: bool = False) -> Dict[str, Any]:
    """{"version", "kv": {key: value (None for arrays)}, "tensors": [{"name", "ggml_type", "dims"}]}: every pair, or
    those up to ``stop_at`` (general.architecture is the first by convention); the tensor table when asked."""
    path = Path(path)
    with open(path, "rb", buffering=1 << 20) as f:
        h = _Header(f, path)
        kv: Dict[str, Any] = {}
        for _ in range(h.n_kv):
            key = h.string()
            (vtype,) = h.unpack("I")
            kv[key] = h.value(vtype)
            if key == stop_at and not tensors:
                break
        table: List[Dict[str, Any]] = []
        if tensors:
            for _ in range(h.n_tensors):
                name = h.string()
                (n_dims,) = h.unpack("I")
                dims = list(h.unpack("Q" * n_dims))
                ggml_type, _offset = h.unpack("IQ")
                table.append({"name": name, "ggml_type": ggml_type, "dims": dims})
    return {"version": h.version, "kv": kv, "tensors": table}
