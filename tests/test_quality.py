"""Quality against the baseline (qbench/evaluate/quality.py): the compact form, its approximations against the
exact full-vocabulary KL divergence, the statistics, and the live and report-time paths on a tiny model."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qbench.evaluate import quality
from qbench.load import tiny

QCFG = OmegaConf.create({"ctx_tokens": 64, "max_windows": 6, "batch_size": 3, "coverage": 0.999, "max_kept": 4096})


@pytest.fixture(scope="module")
def peaked_pair(tmp_path_factory):
    """A tiny Llama whose next-token distributions are peaked like a trained model's (a random model's are
    nearly uniform, which would hide the tail approximation), and a perturbed copy standing for a quantized one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(120.0)  # logits of a few nats' spread: entropy ~ a trained model's
    cand = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in cand.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.08)  # ~ 4-bit rounding noise
    tok = tiny.build_tokenizer()
    text = tiny.TINY_TEXT.read_text()[:60000]
    return base, cand, tok, text, tmp_path_factory.mktemp("quality")


def exact_kl(base, cand, windows):
    """Mean KL(P_base ‖ Q) over every scored token, from both full-vocabulary distributions."""
    first, count = quality.scored_positions(windows.shape[1])
    with torch.no_grad():
        ids = torch.as_tensor(windows)
        lp = torch.log_softmax(base(ids).logits[:, first:first + count].double(), -1)
        lq = torch.log_softmax(cand(ids).logits[:, first:first + count].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_compact_keeps_tokens_until_coverage():
    logp = torch.log_softmax(torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]), -1)
    n_kept, ids, lp = quality.compact(logp, coverage=0.9, max_kept=4)
    p = logp.exp()
    # first row: 0.705, 0.259 -> 0.964 >= 0.9 after two tokens; second row: uniform 0.2 each, capped at 4
    assert n_kept.tolist() == [2, 4]
    assert ids[:2].tolist() == [0, 1]
    assert np.allclose(lp[:2], logp[0, :2].numpy())
    assert float(p[0, :2].sum()) >= 0.9


def _full_sort_compact(logp, coverage):
    """The compact form as one full sort per position computes it (the definition compact() must keep)."""
    lp, ids = torch.sort(logp, dim=-1, descending=True)
    cum = torch.cumsum(lp.double().exp(), -1)
    n = torch.clamp((cum < coverage).sum(-1) + 1, max=logp.shape[-1])
    return n.numpy(), [ids[i, :n[i]].numpy() for i in range(len(n))], [lp[i, :n[i]].numpy() for i in range(len(n))]


def test_compact_two_passes_equal_a_full_sort(monkeypatch):
    """Peaked rows end within the first pass, flat ones need the full sort: both kinds in one window, and the
    kept tokens, their order and log-probs are those of one full sort per position."""
    monkeypatch.setattr(quality, "FIRST_PASS_TOKENS", 8)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen)
    logits[::2] *= 12.0  # peaked: reach 0.99 within a few tokens
    logp = torch.log_softmax(logits, -1)
    n_kept, ids, lp = quality.compact(logp, coverage=0.99, max_kept=None)
    want_n, want_ids, want_lp = _full_sort_compact(logp, 0.99)
    assert n_kept.tolist() == want_n.tolist()
    assert max(n_kept[1::2]) > 8 >= max(n_kept[::2])  # the second pass was needed, and only for the flat rows
    assert ids.tolist() == np.concatenate(want_ids).tolist()
    assert np.array_equal(lp, np.concatenate(want_lp))


def test_compare_live_equals_the_per_position_kl():
    """The vectorised live comparison gives each position the KL of _kl_coarsened on that position alone."""
    gen = torch.Generator().manual_seed(2)
    windows = torch.randint(0, 50, (2, 16), generator=gen).numpy()
    first, count = quality.scored_positions(16)
    ref_lp = torch.log_softmax(torch.randn(2 * count, 50, generator=gen) * 3, -1)
    n_kept, ids, lp = quality.compact(ref_lp, coverage=0.9, max_kept=None)
    ref = {"n_kept": n_kept, "ids": ids, "logp": lp, "tokens": windows,
           "offsets": np.concatenate([[0], np.cumsum(n_kept, dtype=np.int64)]),
           "argmax": ref_lp.argmax(-1).numpy(), "logp_target": np.zeros(2 * count, np.float32)}
    logq = torch.log_softmax(torch.randn(count, 50, generator=gen) * 3, -1)
    rows = np.arange(count, 2 * count)  # the second window
    got = quality.compare_live(ref, 1, logq, rows)
    want = [quality._kl_coarsened(lp[ref["offsets"][n]:ref["offsets"][n + 1]],
                                  logq.numpy()[j, ids[ref["offsets"][n]:ref["offsets"][n + 1]]])
            for j, n in enumerate(rows)]
    assert np.allclose(got["kl"], want, rtol=1e-12, atol=1e-15)
    assert got["logq_target"].tolist() == logq.numpy()[np.arange(count), windows[1, first + 1:]].tolist()
    assert got["same_top"].tolist() == (logq.argmax(-1).numpy() == ref["argmax"][rows]).tolist()


def test_windows_follow_llama_cpp():
    tok = tiny.build_tokenizer()
    windows = quality.corpus_windows(tok, tiny.TINY_TEXT.read_text()[:20000], 32, max_windows=3)
    assert windows.shape == (3, 32)
    ids = tok(tiny.TINY_TEXT.read_text()[:20000], add_special_tokens=False).input_ids
    assert windows[1, 1:].tolist() == ids[33:64]  # non-overlapping, in corpus order
    assert quality.scored_positions(512) == (256, 255)  # llama.cpp: 255 scored tokens per 512-token chunk


def test_live_and_report_time_kl_within_one_percent_of_exact(peaked_pair):
    base, cand, tok, text, tmp = peaked_pair
    meta = {"source": "test", "model_config_hash": "x"}
    b = quality.run(base, tok, QCFG, text=text, cell_dir=tmp / "base", baseline_file=None, meta=meta)
    assert b["role"] == "baseline" and b["comparison"] is None
    # the tail approximation is exercised: the kept tokens are far fewer than the vocabulary
    assert b["kept_tokens_mean"] < tiny.VOCAB_SIZE / 4
    live = quality.run(cand, tok, QCFG, text=text, cell_dir=tmp / "cand",
                       baseline_file=tmp / "base" / quality.LOGPROBS_FILE, meta=meta)
    windows = quality.load(tmp / "base" / quality.LOGPROBS_FILE)["tokens"]
    exact = exact_kl(base, cand, windows)
    assert exact > 1e-3  # the perturbation is visible
    got_live = live["comparison"]["kl_divergence"]["mean"]
    assert live["comparison_source"] == "live"
    assert abs(got_live - exact) / exact <= 0.01
    assert got_live <= exact * (1 + 1e-6)  # coarsening never raises KL (data-processing inequality)
    later = quality.compare_later(tmp / "cand", tmp / "base")
    assert abs(later["kl_divergence"]["mean"] - exact) / exact <= 0.01
    assert later["kl_divergence"]["mean"] <= exact * (1 + 1e-6)  # a lower bound too
    # perplexity, Δp and top-1 agreement are exact in both paths
    assert later["ppl"] == pytest.approx(live["comparison"]["ppl"], rel=1e-6)
    assert later["top1_agreement_pct"]["mean"] == pytest.approx(live["comparison"]["top1_agreement_pct"]["mean"])
    assert later["delta_p_pct"]["rms"] == pytest.approx(live["comparison"]["delta_p_pct"]["rms"], rel=1e-5)


def test_same_model_against_itself_is_zero(peaked_pair):
    base, _, tok, text, tmp = peaked_pair
    meta = {"source": "test", "model_config_hash": "self"}
    quality.run(base, tok, QCFG, text=text, cell_dir=tmp / "s0", baseline_file=None, meta=meta)
    same = quality.run(base, tok, QCFG, text=text, cell_dir=tmp / "s1",
                       baseline_file=tmp / "s0" / quality.LOGPROBS_FILE, meta=meta)["comparison"]
    assert abs(same["kl_divergence"]["mean"]) < 1e-6
    assert same["top1_agreement_pct"]["mean"] == 100.0
    assert same["ppl_ratio"]["mean"] == pytest.approx(1.0, abs=1e-6)


def test_reference_of_other_tokens_is_refused_with_a_warning(peaked_pair):
    base, cand, tok, text, tmp = peaked_pair
    quality.run(base, tok, QCFG, text=text, cell_dir=tmp / "r0", baseline_file=None,
                meta={"source": "test", "model_config_hash": "A"})
    out = quality.run(cand, tok, QCFG, text=text, cell_dir=tmp / "r1", baseline_file=tmp / "r0" / quality.LOGPROBS_FILE,
                      meta={"source": "test", "model_config_hash": "B"})
    assert out["comparison"] is None
    assert "model_config_hash A \u2192 B" in out["warnings"][0]
    assert quality.compare_later(tmp / "r1", tmp / "r0") is None


def test_window_ci_is_a_t_interval_over_window_means():
    values = np.array([1.0, 3.0, 2.0, 4.0, 6.0, 8.0])
    window = np.array([0, 0, 1, 1, 2, 2])
    ci = quality.window_mean_ci(values, window)
    means = np.array([2.0, 3.0, 7.0])
    half = 4.302652729911275 * means.std(ddof=1) / math.sqrt(3)  # t(0.975, df=2)
    assert ci["mean"] == pytest.approx(4.0)
    assert ci["ci95_low"] == pytest.approx(4.0 - half)
    assert ci["ci95_high"] == pytest.approx(4.0 + half)
    assert ci["se_tokens"] == pytest.approx(values.std(ddof=1) / math.sqrt(6))


@pytest.mark.parametrize("key,value,message", [
    ("ctx_tokens", 2, "eval.quality.ctx_tokens: 2 must be at least 4"),
    ("max_windows", 0, "eval.quality.max_windows: 0 is not a positive integer"),
    ("coverage", 1.5, "eval.quality.coverage: 1.5 must be in (0, 1]"),
    ("max_kept", 0, "eval.quality.max_kept: 0 is not a positive integer"),
    ("source", "/nope/corpus.txt", "eval.quality.source: '/nope/corpus.txt' is not a file"),
])
def test_bad_quality_settings_are_one_line(key, value, message):
    from qbench.config import validate_eval, yaml_defaults
    from qbench.errors import ConfigError

    e = yaml_defaults("eval", "quality")
    e.quality[key] = value
    with pytest.raises(ConfigError) as info:
        validate_eval(e)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_report_time_path_reads_as_close_to_exact_as_the_live_path(peaked_pair):
    """A cell measured before its baseline (parallel launchers) is compared from two files; it keeps a tail 100
    times thinner so the baseline's kept tokens are among its own, and reads within the live path's error."""
    base, cand, tok, text, tmp = peaked_pair
    cfg = OmegaConf.create({**QCFG, "max_kept": None})
    meta = {"source": "test", "model_config_hash": "early"}
    early = quality.run(cand, tok, cfg, text=text, cell_dir=tmp / "e1",
                        baseline_file=tmp / "e0" / quality.LOGPROBS_FILE, meta=meta)
    assert early["comparison"] is None and early["settings"]["coverage"] == pytest.approx(0.99999)
    quality.run(base, tok, cfg, text=text, cell_dir=tmp / "e0", baseline_file=None, meta=meta)
    live = quality.run(cand, tok, cfg, text=text, cell_dir=tmp / "e2", baseline_file=tmp / "e0" / quality.LOGPROBS_FILE,
                       meta=meta)["comparison"]["kl_divergence"]["mean"]
    exact = exact_kl(base, cand, quality.load(tmp / "e0" / quality.LOGPROBS_FILE)["tokens"])
    later = quality.compare_later(tmp / "e1", tmp / "e0")["kl_divergence"]["mean"]
    assert later <= exact * (1 + 1e-6)  # still a lower bound
    assert exact - later <= 1.5 * (exact - live)  # same error as live (was 8x the live error with one coverage)


@pytest.mark.gpu
def test_compaction_and_live_comparison_on_the_gpu_equal_the_cpu():
    """On a GPU the log-probs never leave the device whole: the kept tokens, their log-probs and every live
    measure must be what the CPU computes from the same log-probs."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2 * 31, 49152, generator=gen) * 4
    logp = torch.log_softmax(logits, -1)
    cpu = quality.compact(logp, coverage=0.999, max_kept=None)
    gpu = quality.compact(logp.cuda(), coverage=0.999, max_kept=None)
    assert np.array_equal(cpu[0], gpu[0]) and np.array_equal(cpu[2], gpu[2])
    n_kept, ids, lp = cpu
    windows = torch.randint(0, 49152, (2, 64), generator=gen).numpy()
    ref = {"n_kept": n_kept, "ids": ids, "logp": lp, "tokens": windows,
           "offsets": np.concatenate([[0], np.cumsum(n_kept, dtype=np.int64)]),
           "argmax": logp.argmax(-1).numpy(), "logp_target": np.zeros(62, np.float32)}
    logq = torch.log_softmax(logits[31:] + torch.randn(31, 49152, generator=gen), -1)
    rows = np.arange(31, 62)
    a, b = quality.compare_live(ref, 1, logq, rows), quality.compare_live(ref, 1, logq.cuda(), rows)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("vocab,on_disk", [(2048, np.uint16), (65536, np.uint16), (65537, np.int32)])
def test_the_compact_file_is_stored_plain_with_ids_as_narrow_as_the_vocabulary(tmp_path, vocab, on_disk):
    """No zlib (over half a 135M cell's quality phase, for a 16 % smaller file); ids uint16 where the vocabulary fits,
    read back as the same int32 ids."""
    import zipfile

    torch.manual_seed(0)
    windows = torch.randint(0, vocab, (2, 16)).numpy()
    rec = quality.Recorder(windows, 0.9, None)
    for w in range(2):
        rec.add(w, torch.log_softmax(torch.randn(7, vocab) * 4, dim=-1))
    expect = rec.arrays()
    expect["ids"][0] = vocab - 1  # the largest id survives the narrowing
    rec.parts["ids"][0][0] = vocab - 1
    path = tmp_path / quality.LOGPROBS_FILE
    rec.write(path, {"vocab_size": vocab})
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    with np.load(path) as raw:
        assert raw["ids"].dtype == on_disk
    back = quality.load(path)
    assert back["ids"].dtype == np.int32
    for k, v in expect.items():
        np.testing.assert_array_equal(back[k], v)
