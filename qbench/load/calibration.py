"""Calibration data for methods that calibrate, as configuration (``method.calibration``, :class:`CalibrationConfig`).

Sources:
- ``builtin:tiny_text``: qbench/data/tiny_text.txt (GSM8K train questions + MMLU dev items; bundled, offline);
- a local ``.txt`` file (read whole) or ``.jsonl`` file (``text_field`` of every row, e.g. ``question`` for
  GSM8K's train.jsonl);
- ``c4``: allenai/c4, the first English validation shard (the GPTQ paper calibrates on random C4 windows);
- ``wikitext2``: wikitext-2-raw-v1, train split;
- any other Hub dataset id (``subset``, ``split``, ``data_files``, ``text_field``). Hub sources need network.

Samples are built the way the GPTQ reference code does: the texts are joined (blank line between them) and
tokenized once with the model's tokenizer (no special tokens), then ``num_samples`` windows of exactly
``seq_len_tokens`` tokens are cut at offsets drawn from ``random.Random(seed)``. Windows may overlap when the
corpus is short. The result is a list of ``{"input_ids", "attention_mask"}`` rows, GPT-QModel's input format.

``describe()`` gives what goes into the quantized-checkpoint cache key and the result: the settings plus a
content hash of the local corpus; ``build()`` adds the token counts and a hash of the token ids actually used.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING


@dataclass
class CalibrationConfig:
    """The ``calibration`` block of a calibrating method's schema: texts are joined, tokenized with the model's
    tokenizer, and ``num_samples`` windows of ``seq_len_tokens`` are cut at seeded random offsets. The method's
    YAML sets each key's value; only the Hub selectors (subset, split, data_files) may be left out: null there
    means "none, or the shortcut's own", which no shipped YAML needs to say."""

    # "builtin:tiny_text" (bundled, offline), a local .txt / .jsonl file, "c4" (allenai/c4, one en validation
    # shard) or "wikitext2" (wikitext-2-raw-v1 train), or any Hub dataset id (online only)
    source: str = MISSING
    text_field: str = MISSING  # field read from JSONL / Hub rows ("question" for GSM8K's train.jsonl)
    num_samples: int = MISSING  # calibration sequences
    seq_len_tokens: int = MISSING  # tokens per calibration sequence
    seed: int = MISSING  # seed of the window offsets
    # windows per forward pass while quantizing (GPT-QModel's own default: 1): speed, not the data (sums regroup,
    # so weights move at float-noise level: it is in the cache key); memory: one layer's activations x batch_size
    batch_size: int = MISSING
    subset: Optional[str] = None  # Hub dataset config name (e.g. "wikitext-2-raw-v1"); null = none / shortcut's
    split: Optional[str] = None  # Hub split; null = "train" (the shortcuts pick their own)
    data_files: Optional[str] = None  # Hub data file(s) in the dataset repo; null = all (C4: one shard by default)


BUILTIN = {"builtin:tiny_text": Path(__file__).parents[1] / "data" / "tiny_text.txt"}

# Hub shortcuts: (dataset id, subset, split, data_files, text field)
HUB_SHORTCUTS = {
    "c4": ("allenai/c4", None, "train", "en/c4-validation.00000-of-00008.json.gz", "text"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None, "text"),
}
# Default data file when the source is allenai/c4 itself: never let a calibration pull all of C4.
C4_DEFAULT_FILES = "en/c4-validation.00000-of-00008.json.gz"

SEPARATOR = "\n\n"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def local_path(source: str) -> Path | None:
    """The file behind a builtin or local source, or None for a Hub dataset."""
    if source in BUILTIN:
        return BUILTIN[source]
    if source.startswith("builtin:"):
        raise ValueError(f"method.calibration.source: unknown builtin '{source}'; known: {', '.join(BUILTIN)}")
    p = Path(source).expanduser()
    if p.exists() or source.endswith((".txt", ".jsonl", ".json")) or source.startswith(("/", ".", "~")):
        return p
    return None


def validate(cfg: Any) -> None:
    """Raise ConfigError naming the key for impossible calibration settings (no file is read but a stat)."""
    from qbench.errors import ConfigError

    source = _get(cfg, "source")
    if not source:
        raise ConfigError("method.calibration.source: empty; use builtin:tiny_text, a file, c4 or wikitext2")
    if int(_get(cfg, "num_samples", 0)) <= 0:
        raise ConfigError(f"method.calibration.num_samples: {_get(cfg, 'num_samples')} must be positive")
    if int(_get(cfg, "seq_len_tokens", 0)) <= 0:
        raise ConfigError(f"method.calibration.seq_len_tokens: {_get(cfg, 'seq_len_tokens')} must be positive")
    if int(_get(cfg, "batch_size", 8)) <= 0:
        raise ConfigError(f"method.calibration.batch_size: {_get(cfg, 'batch_size')} must be positive")
    try:
        path = local_path(source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"method.calibration.source: file '{source}' does not exist")
        if path.suffix not in (".txt", ".jsonl", ".json"):
            raise ConfigError(f"method.calibration.source: '{source}' is neither .txt nor .jsonl")
        check_file(path, _get(cfg, "text_field", "text"))
    else:
        from qbench.errors import hub_offline

        if hub_offline():
            raise ConfigError(
                f"method.calibration.source: '{source}' is a Hub dataset and HF_HUB_OFFLINE is set; "
                "use builtin:tiny_text or a local .txt/.jsonl file"
            )


def check_file(path: Path, text_field: str = "text") -> None:
    """A local calibration file reads as _read_texts will read it, or ConfigError naming the key, the file and the
    line: text (not empty, binary or other than UTF-8); for .jsonl every non-empty line a JSON object whose
    ``text_field`` is a string."""
    from qbench.config import check_text_file
    from qbench.errors import ConfigError

    text = check_text_file(path, "method.calibration.source")
    if path.suffix == ".txt":
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"method.calibration.source: '{path}' line {line_no} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            got = f"keys: {', '.join(sorted(row))}" if isinstance(row, dict) else f"a {type(row).__name__}"
            raise ConfigError(f"method.calibration.text_field: '{path}' line {line_no} has no string field "
                              f"'{text_field}' ({got})")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hub_spec(cfg: Any) -> Dict[str, Any]:
    source = _get(cfg, "source")
    if source in HUB_SHORTCUTS:
        ds, subset, split, files, field = HUB_SHORTCUTS[source]
        return {
            "dataset": ds,
            "subset": _get(cfg, "subset") or subset,
            "split": _get(cfg, "split") or split,
            "data_files": _get(cfg, "data_files") or files,
            "text_field": field if _get(cfg, "text_field", "text") == "text" else _get(cfg, "text_field"),
        }
    files = _get(cfg, "data_files")
    if source == "allenai/c4" and not files:
        files = C4_DEFAULT_FILES
    return {
        "dataset": source,
        "subset": _get(cfg, "subset"),
        "split": _get(cfg, "split") or "train",
        "data_files": files,
        "text_field": _get(cfg, "text_field", "text"),
    }


def describe(cfg: Any) -> Dict[str, Any]:
    """Settings that determine the calibration tokens (for a given tokenizer), JSON-ready."""
    source = _get(cfg, "source")
    out: Dict[str, Any] = {
        "source": source,
        "num_samples": int(_get(cfg, "num_samples")),
        "seq_len_tokens": int(_get(cfg, "seq_len_tokens")),
        "seed": int(_get(cfg, "seed", 0)),
        "batch_size": int(_get(cfg, "batch_size", 8)),
    }
    path = local_path(source)
    if path is not None:
        out["path"] = str(path)
        out["format"] = "jsonl" if path.suffix in (".jsonl", ".json") else "txt"
        if out["format"] == "jsonl":
            out["text_field"] = _get(cfg, "text_field", "text")
        out["file_sha256"] = _sha256_file(path) if path.is_file() else None
    else:
        out["hub"] = _hub_spec(cfg)
    return out


def _read_texts(cfg: Any, min_chars: int) -> List[str]:
    source = _get(cfg, "source")
    path = local_path(source)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"method.calibration.source: file '{source}' does not exist")
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        field = _get(cfg, "text_field", "text")
        texts = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if field not in row:
                    raise KeyError(f"method.calibration.text_field: '{field}' not in row {i} of {path} (keys: {sorted(row)})")
                texts.append(str(row[field]))
        return texts
    return _read_hub(_hub_spec(cfg), min_chars)


def _read_hub(spec: Dict[str, Any], min_chars: int) -> List[str]:
    """Stream rows of a Hub dataset until about ``min_chars`` characters are collected (network needed)."""
    from datasets import load_dataset

    kwargs: Dict[str, Any] = {"split": spec["split"], "streaming": True}
    if spec.get("data_files"):
        kwargs["data_files"] = spec["data_files"]
    args = [spec["dataset"]] + ([spec["subset"]] if spec.get("subset") else [])
    ds = load_dataset(*args, **kwargs)
    texts, total = [], 0
    for row in ds:
        text = row.get(spec["text_field"])
        if not text or not str(text).strip():
            continue
        texts.append(str(text))
        total += len(text)
        if total >= min_chars:
            break
    return texts


def build(cfg: Any, tokenizer: Any) -> Tuple[List[Dict[str, List[int]]], Dict[str, Any]]:
    """Calibration rows for GPT-QModel and what to record about them."""
    info = describe(cfg)
    n, length, seed = info["num_samples"], info["seq_len_tokens"], info["seed"]
    # For Hub streams: enough text for the windows to be mostly disjoint (~4 chars per token, 2x margin).
    texts = _read_texts(cfg, min_chars=8 * n * length)
    if not texts:
        raise ValueError(f"method.calibration.source: '{info['source']}' gave no text")
    ids = tokenizer(SEPARATOR.join(texts), add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(
            f"method.calibration.seq_len_tokens: {length} is longer than the whole calibration corpus "
            f"('{info['source']}': {len(ids)} tokens with this tokenizer)"
        )
    rng = random.Random(seed)
    rows = []
    digest = hashlib.sha256()
    for _ in range(n):
        start = rng.randint(0, len(ids) - length)
        window = [int(t) for t in ids[start : start + length]]
        digest.update(json.dumps(window).encode())
        rows.append({"input_ids": window, "attention_mask": [1] * length})
    info.update(
        {
            "texts": len(texts),
            "corpus_tokens": len(ids),
            "calibration_tokens": n * length,
            "windows_overlap_possible": n * length > len(ids),
            "token_ids_sha256": digest.hexdigest(),
        }
    )
    return rows, info
