"""Local GSM8K for the offline ``qbench_gsm8k`` task: openai/grade-school-math jsonl -> the Hub (openai/gsm8k) schema.

Self-contained (lm-eval imports this file by path): only the standard library and ``datasets``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FIXTURES_DIR = Path(__file__).resolve().parents[2] / "data" / "fixtures"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``builtin:fixtures`` -> the bundled fixtures; None -> $QBENCH_DATA; else the given directory."""
    data_dir = data_dir or os.environ.get("QBENCH_DATA")
    if not data_dir:
        raise ValueError(
            "offline MMLU/GSM8K needs a data directory: pass metadata {'qbench_data_dir': DIR} to lm-eval's "
            "TaskManager (qbench does it from eval.data_dir) or set QBENCH_DATA; 'builtin:fixtures' = bundled subset"
        )
    if str(data_dir) == "builtin:fixtures":
        return FIXTURES_DIR
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"offline data directory '{data_dir}' does not exist")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise ValueError(f"{path}:{line_no}: expected string fields 'question' and 'answer'")
            rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def load_gsm8k(qbench_data_dir: str | None = None, **_ignored):
    """``custom_dataset`` of qbench_gsm8k: a DatasetDict with splits train and test, columns question and answer."""
    import datasets

    root = resolve_data_dir(qbench_data_dir) / "gsm8k"
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string")})
    splits = {}
    for split in ("train", "test"):
        path = root / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"GSM8K: {path} is missing")
        splits[split] = datasets.Dataset.from_list(read_jsonl(path), features=features)
    return datasets.DatasetDict(splits)
