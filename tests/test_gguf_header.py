"""qbench's GGUF header reader (qbench/load/gguf_header.py) against gguf's own GGUFReader on the packaged SmolLM2 GGUF
and the tiny model's f32 and Q8_0 GGUFs: the same keys and scalar values, the same tensor table, in a fraction of
the time."""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from qbench.load import gguf_header, models, tiny, weights

SMOLLM2 = weights.default_dest() / weights.file_name("smollm2")
SOURCES = Path(os.environ.get("QBENCH_LLAMACPP_SRC") or weights.default_dest().parent / "llama.cpp-0.3.36")


def _reference(path: Path):
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(str(path))
    kv = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        kv[name] = None if vtype == GGUFValueType.ARRAY else field.contents()
    tensors = [{"name": t.name, "type": t.tensor_type.name, "elements": int(t.n_elements), "bytes": int(t.n_bytes)}
               for t in r.tensors]
    return kv, tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not SMOLLM2.exists():
        pytest.fail(f"{SMOLLM2} is missing: `make weights` fetches it (make test does)")
    out = [SMOLLM2]
    if (SOURCES / "convert_hf_to_gguf.py").is_file():
        pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")
        from qbench.methods import _llamacpp as lc

        tmp = tmp_path_factory.mktemp("hdr")
        lc.convert(tiny.build(tmp / "tiny"), tmp / "f32.gguf", SOURCES, tmp / "convert.log")
        lc.quantize(tmp / "f32.gguf", tmp / "q8_0.gguf", "Q8_0", 1)
        out += [tmp / "f32.gguf", tmp / "q8_0.gguf"]
    return out


def test_the_header_reads_as_ggufs_own_reader_does(files):
    from qbench.methods import _llamacpp as lc

    for path in files:
        kv, tensors = _reference(path)
        mine = gguf_header.read(path, tensors=True)
        assert mine["kv"].keys() == kv.keys()
        for key, value in kv.items():
            assert mine["kv"][key] == (pytest.approx(value) if isinstance(value, float) else value), key
        assert lc.tensor_types(path) == tensors
        assert models.gguf_architecture(path) == kv["general.architecture"]
        assert lc.file_type(path) == lc_file_type_reference(path)


def lc_file_type_reference(path: Path):
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).get_field("general.file_type")
    return None if field is None else LlamaFileType(int(field.parts[field.data[0]][0])).name


def test_the_architecture_is_read_without_the_vocabulary(files):
    t0 = time.perf_counter()
    assert models.gguf_architecture(SMOLLM2) == "llama"
    quick = time.perf_counter() - t0
    t0 = time.perf_counter()
    _reference(SMOLLM2)
    slow = time.perf_counter() - t0
    assert quick < 0.1 * slow, (quick, slow)


def test_a_file_that_is_not_gguf_or_ends_early_is_a_value_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="no GGUF magic"):
        gguf_header.read(bad)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + struct.pack("<Q", 100) + b"general")
    with pytest.raises(ValueError, match="ends early|unknown"):
        gguf_header.read(short)
