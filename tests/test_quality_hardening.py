"""Quality figures that mean what they say (issue 29, items 7, 9, 10): they do not depend on how many windows
share a forward pass, a baseline of another batch size is never compared silently, every stored position keeps
its stated coverage (or the cell says where a cap cut it), and a figure that is not finite says why."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qbench.config import yaml_defaults
from qbench.evaluate import quality
from qbench.load import tiny

META = {"source": "test", "model_config_hash": "m"}


def _cfg(**over):
    """The shipped settings (conf/eval/quality.yaml's quality block), with a small corpus."""
    cfg = yaml_defaults("eval", "quality").quality
    cfg.ctx_tokens, cfg.max_windows = 64, 4
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _llama(vocab: int = tiny.VOCAB_SIZE, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def text():
    return tiny.TINY_TEXT.read_text()[:30000]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    """The tiny model under LLM.int8 on CPU; threshold 2 so its random activations have outlier columns (a
    trained model's pass 6), which LLM.int8 picks over every row of the batch."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tiny.build(tmp_path_factory.mktemp("tiny"))
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=2.0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, quantization_config=quant,
                                                device_map="cpu").eval()


def test_default_quality_figures_do_not_depend_on_the_batch(int8_model, tok, text, tmp_path):
    windows = quality.corpus_windows(tok, text, 64, 4)
    alone = torch.stack([next(quality.window_logprobs(int8_model, windows[w:w + 1], 1))[1] for w in range(4)])
    batched = torch.stack([lp for _, lp in quality.window_logprobs(int8_model, windows, 4)])
    assert not torch.equal(alone, batched)  # the batch changes LLM.int8's logits: the reason for the default
    first, count = quality.scored_positions(64)
    targets = torch.as_tensor(windows[:, first + 1:first + 1 + count])
    ppl_alone = float((-alone.double().gather(-1, targets[..., None]).mean()).exp())
    got = quality.run(int8_model, tok, _cfg(), text=text, cell_dir=tmp_path, baseline_file=None, meta=META)
    assert got["ppl"] == pytest.approx(ppl_alone, rel=1e-9)  # each window scored as if alone
    assert got["settings"]["batch_size"] == 1


def test_a_baseline_of_another_batch_size_is_refused_by_name(tok, text, tmp_path):
    base, cand = _llama(seed=0), _llama(seed=1)
    quality.run(base, tok, _cfg(batch_size=4), text=text, cell_dir=tmp_path / "b", baseline_file=None, meta=META)
    out = quality.run(cand, tok, _cfg(batch_size=1), text=text, cell_dir=tmp_path / "c",
                      baseline_file=tmp_path / "b" / quality.LOGPROBS_FILE, meta=META)
    assert out["comparison"] is None
    assert len(out["warnings"]) == 1 and "batch_size 4 \u2192 1" in out["warnings"][0]
    assert quality.compare_later(tmp_path / "c", tmp_path / "b") is None  # nor at report time


def test_default_storage_keeps_every_position_to_its_coverage(tok, text, tmp_path):
    # random init over 8192 tokens: nearly flat distributions, the case where a fixed cap (4096) cuts early
    out = quality.run(_llama(vocab=8192), tok, _cfg(max_windows=2), text=text, cell_dir=tmp_path, baseline_file=None,
                      meta=META)
    assert out["kept_tokens_mean"] > 4096
    assert out["kept_mass_min"] >= 0.999 - 1e-6 and out["kept_below_coverage"] == 0
    assert out["warnings"] == []


def test_a_cap_that_cuts_before_coverage_is_counted_and_warned(tok, text, tmp_path):
    out = quality.run(_llama(vocab=8192), tok, _cfg(max_windows=2, max_kept=1024), text=text, cell_dir=tmp_path,
                      baseline_file=None, meta=META)
    assert out["kept_below_coverage"] == out["n_tokens"]
    assert out["kept_mass_min"] < 0.5
    assert len(out["warnings"]) == 1
    assert out["warnings"][0].startswith("quality: eval.quality.max_kept=1024 stopped 62 of 62 positions")


class NanAt:
    """A model whose logits are NaN at a few positions of its second window, as an overflowing kernel gives."""

    def __init__(self, model, windows):
        self.model, self.bad = model, torch.as_tensor(windows[1])

    def parameters(self):
        return self.model.parameters()

    def __call__(self, batch):
        out = self.model(batch)
        for j in range(batch.shape[0]):
            if torch.equal(batch[j], self.bad):
                out.logits[j, 40:43] = float("nan")
        return out


def test_non_finite_figures_are_recorded_with_the_reason(tok, text, tmp_path):
    base = _llama()
    windows = quality.corpus_windows(tok, text, 64, 4)
    quality.run(base, tok, _cfg(), text=text, cell_dir=tmp_path / "b", baseline_file=None, meta=META)
    broken = NanAt(base, windows)
    out = quality.run(broken, tok, _cfg(), text=text, cell_dir=tmp_path / "c",
                      baseline_file=tmp_path / "b" / quality.LOGPROBS_FILE, meta=META)
    assert np.isnan(out["ppl"]) and np.isnan(out["comparison"]["kl_divergence"]["mean"])
    why = "NaN or infinite logits in this cell at 3 of 124 scored positions (first in window 1)"
    assert out["nonfinite"] == {"ppl": "NaN or infinite logits at 3 of 124 scored positions (first in window 1)",
                                "kl": why}
    assert out["comparison"]["nonfinite"] == why
    assert f"quality: kl not finite: {why}" in out["warnings"]
    # the same reason when the comparison is made at report time
    quality.run(broken, tok, _cfg(), text=text, cell_dir=tmp_path / "early",
                baseline_file=tmp_path / "none" / quality.LOGPROBS_FILE, meta=META)
    assert quality.compare_later(tmp_path / "early", tmp_path / "b")["nonfinite"] == why
