"""Preflight checks every input a cell will read before a model loads (issue 29, items 3 and 4): the model's
widths (the builtin tiny model's too), quality and perplexity corpora, calibration files, offline data rows, and
a model folder's config.json and safetensors headers. Each error is one line naming the key and the file."""
from __future__ import annotations

import pytest

from qbench.errors import ConfigError
from qbench.run import cli


def preflight_error(tmp_path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        cli.preflight([*overrides, f"run.runs_dir={tmp_path / 'runs'}"])
    line = str(info.value)
    assert "\n" not in line, line
    assert not (tmp_path / "runs").exists(), "preflight wrote under runs/"
    return line


# ----------------------------------------------------------------------------------------------- widths (item 3)
@pytest.mark.parametrize("method,group,needle", [
    ("hqq", 4096, "does not divide the input width 128"),
    ("hqq", 96, "does not divide the input width 128"),
])
def test_builtin_tiny_widths_are_checked(tmp_path, method, group, needle):
    line = preflight_error(tmp_path, "model=tiny", f"method={method}", f"method.group_size={group}")
    assert line.startswith("method.group_size:") and needle in line, line


def test_builtin_tiny_config_is_its_real_one():
    from omegaconf import OmegaConf

    from qbench.load import models, tiny

    cfg = OmegaConf.create({"source": "builtin:tiny", "config_overrides": {}, "architecture": None})
    assert models.config_dict(cfg) == tiny.TINY_LLAMA


# ----------------------------------------------------------------------------------------------- corpora (item 4)
BAD_TEXTS = {
    "empty": (b"", "is empty"),
    "blank": (b"  \n\n\t\n", "is empty"),
    "binary": (b"some text\nmore\x00\x01\x02", "binary file, not text (a NUL byte on line 2)"),
    "latin1": ("line one\nline two\ncaf\u00e9 au lait\n".encode("latin-1"), "not UTF-8 text (line 3"),
    "too-short": (b"only a few words", "fewer than the 512 tokens one window needs"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXTS))
@pytest.mark.parametrize("section,length_key", [("quality", "ctx_tokens"), ("perplexity", "seq_len_tokens")])
def test_a_corpus_that_cannot_be_read_fails_preflight(tmp_path, case, section, length_key):
    data, needle = BAD_TEXTS[case]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(data)
    line = preflight_error(tmp_path, "model=tiny", f"eval.{section}.enabled=true", f"eval.{section}.source={corpus}",
                           f"eval.{section}.{length_key}=512")
    assert line.startswith(f"eval.{section}.source: '{corpus}'") and needle in line, line


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n', "line 3 is not JSON"),
    (b'{"text": "fine"}\n\n{"body": "x"}\n', "line 3 has no string field 'text' (keys: body)"),
    (b'{"text": "fine"}\n[1, 2]\n', "line 2 has no string field 'text' (a list)"),
    (b'{"text": "caf\xe9"}\n', "not UTF-8 text (line 1"),
    (b"", "is empty"),
])
def test_a_calibration_file_that_cannot_be_read_fails_preflight(tmp_path, content, needle):
    path = tmp_path / "calib.jsonl"
    path.write_bytes(content)
    line = preflight_error(tmp_path, "model=tiny", "method=gptq", f"method.calibration.source={path}")
    assert line.startswith("method.calibration.") and str(path) in line and needle in line, line


def test_a_binary_calibration_text_fails_preflight(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    line = preflight_error(tmp_path, "model=tiny", "method=awq", f"method.calibration.source={path}")
    assert line.startswith(f"method.calibration.source: '{path}' is a binary file"), line


# ----------------------------------------------------------------------------------------------- offline data rows
@pytest.fixture
def data_dir(tmp_path):
    import shutil

    from qbench.evaluate.lm_eval_tasks import FIXTURES_DIR

    root = tmp_path / "data"
    shutil.copytree(FIXTURES_DIR, root)
    return root


def eval_args(root, task):
    subject = ["eval.mmlu_subjects=[philosophy]"] if task == "mmlu" else []
    return ["model=tiny", "eval.enabled=true", f"eval.tasks=[{task}]", f"eval.data_dir={root}", "eval.offline=true",
            *subject]


@pytest.mark.parametrize("task,rel,append,needle", [
    ("mmlu", "mmlu/test/philosophy_test.csv", b"a question,1,2,3\n", "expected 6 cells"),
    ("mmlu", "mmlu/dev/philosophy_dev.csv", b"q,1,2,3,4,E\n", "answer 'E' is not one of A, B, C, D"),
    ("mmlu", "mmlu/test/philosophy_test.csv", b"q,1,2,3,4,\xff\n", "not UTF-8 text (line"),
    ("gsm8k", "gsm8k/test.jsonl", b'{"question": "q", "answer": \n', "not JSON"),
    ("gsm8k", "gsm8k/train.jsonl", b'{"question": "q"}\n', "expected string fields 'question' and 'answer'"),
])
def test_a_malformed_data_row_fails_preflight_naming_file_and_line(tmp_path, data_dir, task, rel, append, needle):
    path = data_dir / rel
    if not path.exists():
        pytest.skip(f"fixtures have no {rel}")
    lines = path.read_bytes().count(b"\n")
    cli.preflight([*eval_args(data_dir, task), f"run.runs_dir={tmp_path / 'ok-runs'}"])  # the pristine copy passes
    with open(path, "ab") as f:
        f.write(append)
    line = preflight_error(tmp_path, *eval_args(data_dir, task))
    assert line.startswith("eval.data_dir:") and str(path) in line and needle in line, line
    if "UTF-8" not in needle:
        assert f"{path}:{lines + 1}:" in line, line


# ----------------------------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from qbench.load import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def folder(tmp_path, tiny_folder):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_folder, out)
    return out


def model_args(folder):
    return ["model=tiny", f"model.source={folder}"]


def test_an_unparsable_config_json_names_file_and_line(tmp_path, folder):
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"hidden_size"', 'hidden_size', 1))
    line = preflight_error(tmp_path, *model_args(folder))
    assert line.startswith(f"model.source: '{config}' is not valid JSON (line "), line


def test_a_broken_safetensors_header_names_the_file(tmp_path, folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    line = preflight_error(tmp_path, *model_args(folder))
    assert line.startswith(f"model.source: '{weights}' has a broken safetensors header"), line


def test_a_truncated_safetensors_file_fails(tmp_path, folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    line = preflight_error(tmp_path, *model_args(folder))
    assert line.startswith(f"model.source: '{weights}' has a broken safetensors header"), line


def _edit_config(folder, **changes):
    import json

    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_shapes_inconsistent_with_config_name_tensor_file_and_shapes(tmp_path, folder):
    cli.preflight([*model_args(folder), f"run.runs_dir={tmp_path / 'ok-runs'}"])  # the folder as built passes
    _edit_config(folder, intermediate_size=512)
    line = preflight_error(tmp_path, *model_args(folder))
    assert "model.source: tensor 'model.layers.0.mlp" in line and "has shape [" in line and "512" in line, line
    assert str(folder / "model.safetensors") in line and str(folder / "config.json") in line, line


def test_tensors_the_config_needs_but_the_folder_lacks(tmp_path, folder):
    _edit_config(folder, num_hidden_layers=3)
    line = preflight_error(tmp_path, *model_args(folder))
    assert line.startswith(f"model.source: '{folder}' lacks") and "model.layers.2." in line, line
