"""Offline lm-eval task definitions: the stock ``mmlu`` and ``gsm8k`` tasks reading local files.

``qbench_mmlu`` (group, 57 ``qbench_mmlu_<subject>`` tasks in the stock four category groups) and ``qbench_gsm8k``
are the stock lm-eval 0.4.13 tasks with only the data source changed (see ``_generate.py``): the hendrycks MMLU
CSVs (``<data_dir>/mmlu/{dev,val,test}/<subject>_<split>.csv``) and GSM8K's jsonl (``<data_dir>/gsm8k/{train,test}.jsonl``)
are converted to the Hub schema the stock prompts expect. ``data_dir`` comes from the TaskManager metadata key
``qbench_data_dir`` (or the environment variable ``QBENCH_DATA``); ``builtin:fixtures`` means the small subsets
bundled in qbench/data/fixtures.

From the lm-eval command line::

    lm_eval --include_path qbench/evaluate/lm_eval_tasks --tasks qbench_mmlu --num_fewshot 5 \\
        --metadata '{"qbench_data_dir": "../shared/data"}' ...
"""
import os
from pathlib import Path

TASKS_DIR = Path(__file__).parent
FIXTURES_DIR = TASKS_DIR.parents[1] / "data" / "fixtures"
# lm-eval's four MMLU categories (group names mmlu_<category>), in its reporting order
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
MMLU_CATEGORY_ALIASES = {"stem": "stem", "humanities": "humanities", "social_sciences": "social sciences", "other": "other"}
# subject -> category, as tagged in lm-eval 0.4.13's lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml
# (tests/test_offline_tasks.py checks it against the installed lm-eval)
MMLU_SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}


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
