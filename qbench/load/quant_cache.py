"""Quantize once: the cache of quantized checkpoints under ``<cache_dir>/quantized/<key>``.

The key hashes everything that changes the quantized weights:
- the source model: path, revision, and a fingerprint of its files (config.json contents, the safetensors
  index, names and sizes of the weight files; the builtin / random-init directories already carry a content
  hash in their names);
- the method settings that shape the weights (kind, bits, group size, sym, act-order, damping, format, dtype);
- the calibration settings (and the content hash of a local calibration file) and the tokenizer;
- the device type that quantized (a GPU and a CPU run differ numerically, and their quantize times differ);
- the versions of the libraries the checkpoint depends on (the method says which).
Kernel choice (``method.backend``) is not in the key: one checkpoint loads with any kernel.

A checkpoint is built into ``.<key>.tmp-<pid>`` next to its final place and renamed into place, under an
flock on ``.<key>.lock``, so two parallel cells that need the same checkpoint build it once; the second waits
and then loads. ``qbench_quantize.json`` inside the checkpoint (written last, before the rename) holds what
the build cost (``quantize_s``, peak memory) and with what (calibration, versions): a cache hit reports the
original cost from it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

META_FILE = "qbench_quantize.json"
KEY_VERSION = 1


def cache_root(source: Any) -> Path:
    """``<cache_dir>`` of the run: ``source.info["cache_dir"]``, else $QBENCH_CACHE, else .cache/qbench."""
    info = getattr(source, "info", None) or {}
    root = info.get("cache_dir") or os.environ.get("QBENCH_CACHE") or ".cache/qbench"
    return Path(root).expanduser()


def source_fingerprint(source: Any) -> Dict[str, Any]:
    """What identifies the source weights without hashing gigabytes."""
    path = Path(str(source.path)).expanduser()
    fp: Dict[str, Any] = {"path": str(source.path), "revision": source.revision}
    if not path.is_dir():
        fp["hub_commit"] = _hub_commit(str(source.path), source.revision)
        return fp
    fp["dir_name"] = path.name  # tiny-<hash> / random-<name>-<hash>: a content hash already
    cfg = path / "config.json"
    fp["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.exists() else None
    files = {}
    for p in sorted(path.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json"):
            files[p.name] = p.stat().st_size
        if p.name.endswith(".index.json"):
            fp[f"{p.name}_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    fp["weight_files"] = files
    return fp


def _hub_commit(repo: str, revision: Optional[str]) -> Optional[str]:
    """The commit a Hub id resolves to, when online; None offline (the key then relies on path + revision)."""
    from qbench.errors import hub_offline

    if hub_offline():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo, revision=revision).sha
    except Exception:
        return None


def cache_key(payload: Dict[str, Any]) -> str:
    from qbench.store.identity import content_hash

    return content_hash({"v": KEY_VERSION, **payload}, length=20)


def read_meta(checkpoint: Path) -> Optional[Dict[str, Any]]:
    from qbench.store.jsonio import read_json

    return read_json(Path(checkpoint) / META_FILE)


def get_or_build(
    root: Path, key: str, build: Callable[[Path], Dict[str, Any]]
) -> Tuple[Path, Dict[str, Any], bool]:
    """``(checkpoint_dir, metadata, cache_hit)``; ``build(tmp_dir)`` writes a checkpoint and returns its metadata.

    A directory without metadata (an interrupted rename cannot leave one, but a hand-made mess can) is rebuilt.
    A failed build leaves nothing behind but its log, kept as ``.<key>.failed.log`` for a look.
    """
    from qbench.store.jsonio import write_json_atomic
    from qbench.store.locks import file_lock

    final = Path(root) / "quantized" / key
    meta = read_meta(final)
    if meta is not None:
        return final, meta, True
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{key}.lock"):
        meta = read_meta(final)
        if meta is not None:  # built by another cell while this one waited for the lock
            return final, meta, True
        tmp = final.parent / f".{key}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            meta = build(tmp)
            meta = {"cache_key": key, **meta}
            write_json_atomic(tmp / META_FILE, meta)
        except BaseException:
            log = tmp / "quantize.log"
            if log.exists():
                shutil.copyfile(log, final.parent / f".{key}.failed.log")
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final, meta, False
