"""Local GSM8K for the offline ``qbench_gsm8k`` task: openai/grade-school-math jsonl -> the Hub (openai/gsm8k) schema.

lm-eval imports this file by path; it needs only the standard library, ``datasets`` and qbench.evaluate.lm_eval_tasks.
"""
from __future__ import annotations

import json
import os

from qbench.evaluate.lm_eval_tasks import FIXTURES_DIR, resolve_data_dir  # noqa: F401  (lm-eval loads this file by path)


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
