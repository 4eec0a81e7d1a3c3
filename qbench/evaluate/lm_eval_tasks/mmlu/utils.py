"""Local MMLU for the offline ``qbench_mmlu_*`` tasks: hendrycks CSVs -> the Hub (cais/mmlu) schema.

lm-eval imports this file by path; it needs only the standard library, ``datasets`` and qbench.evaluate.lm_eval_tasks.
Cells are read with the csv module, never through pandas type inference, so "None", "NA", "1.50" or "FALSE"
stay the exact strings the question shows.
"""
from __future__ import annotations

import csv
import os

from qbench.evaluate.lm_eval_tasks import FIXTURES_DIR, resolve_data_dir  # noqa: F401  (lm-eval loads this file by path)

LETTERS = ("A", "B", "C", "D")
# hendrycks file split name -> Hub split name
SPLITS = {"dev": "dev", "val": "validation", "test": "test"}


def read_mmlu_csv(path: str | os.PathLike, subject: str) -> list[dict]:
    """Rows of one hendrycks CSV (no header: question, A, B, C, D, answer letter) in the Hub schema."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6:
                raise ValueError(f"{path}:{line_no}: expected 6 cells (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip()
            if answer not in LETTERS:
                raise ValueError(f"{path}:{line_no}: answer '{row[5]}' is not one of A, B, C, D")
            rows.append({"question": row[0], "subject": subject, "choices": list(row[1:5]),
                         "answer": LETTERS.index(answer)})
    return rows


def mmlu_features():
    import datasets

    return datasets.Features({
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=list(LETTERS)),
    })


def load_mmlu(subject: str, qbench_data_dir: str | None = None, **_ignored):
    """``custom_dataset`` of the qbench_mmlu_<subject> tasks: a DatasetDict with the Hub's splits and columns."""
    import datasets

    root = resolve_data_dir(qbench_data_dir) / "mmlu"
    splits = {}
    for file_split, hub_split in SPLITS.items():
        path = root / file_split / f"{subject}_{file_split}.csv"
        if path.exists():
            rows = read_mmlu_csv(path, subject)
            splits[hub_split] = datasets.Dataset.from_list(rows, features=mmlu_features())
        elif file_split in ("dev", "test"):
            raise FileNotFoundError(f"MMLU {subject}: {path} is missing")
    return datasets.DatasetDict(splits)
