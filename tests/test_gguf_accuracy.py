"""lm-eval through llama.cpp (qbench/methods/_llamacpp_lm.py) against HFLM on the same requests, on the tiny model:
the f32 GGUF's log-likelihoods match torch fp32's, Q8_0's stay close, greedy generation stops where lm-eval says.
The requests are lm-eval's own (MMLU and GSM8K from the bundled fixtures), recorded from an HFLM run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")


from qbench.config import validate_eval, yaml_defaults
from qbench.evaluate import accuracy
from qbench.load import tiny, weights

SOURCES = Path(os.environ.get("QBENCH_LLAMACPP_SRC") or weights.default_dest().parent / "llama.cpp-0.3.36")
SUBJECTS = ["college_mathematics", "philosophy"]
CTX = 4096  # llama.cpp context of the test's models (tokens): the tiny model's own, what HFLM uses for it


def eval_cfg(**kw):
    base = dict(enabled=True, tasks=["mmlu", "gsm8k"], offline="true", data_dir="builtin:fixtures",
                mmlu_subjects=SUBJECTS, limit=2, task_limits={"gsm8k": 2}, max_gen_toks=8, batch_size=4, seed=1234,
                perplexity={"enabled": False})
    base.update(kw)
    cfg = yaml_defaults("eval", "none", **base)
    validate_eval(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The tiny model in torch (fp32) and as llama.cpp's f32 and Q8_0 GGUFs of the same weights."""
    pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")
    if not (SOURCES / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"{SOURCES} has no converter: `python -m qbench.methods._llamacpp setup` (make install runs it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qbench.methods import _llamacpp as lc

    tmp = tmp_path_factory.mktemp("tiny_gguf")
    path = tiny.build(tmp / "tiny")
    lc.convert(path, tmp / "f32.gguf", SOURCES, tmp / "convert.log")
    lc.quantize(tmp / "f32.gguf", tmp / "q8_0.gguf", "Q8_0", 1)
    torch_model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # 4096 tokens: the tiny tokenizer's 2,048 pieces make a 5-shot GSM8K prompt longer than the default 1,024
    ggufs = {name: lc.LlamaCppLM(tmp / f"{name}.gguf", CTX, 1, 512) for name in ("f32", "q8_0")}
    return torch_model, tok, ggufs


@pytest.fixture(scope="module")
def recorded(tiny_gguf):
    """lm-eval's MMLU and GSM8K requests and HFLM's answers to them (torch fp32)."""
    torch_model, tok, _ = tiny_gguf
    calls = {}

    def recording_hflm(model, tokenizer, cfg, device):
        lm = accuracy._make_lm(model, tokenizer, cfg, device)
        for name in ("loglikelihood", "generate_until"):
            call = getattr(lm, name)

            def wrapped(requests, disable_tqdm=False, _call=call, _name=name):
                calls.setdefault(_name, ([], []))
                answers = _call(requests, disable_tqdm=disable_tqdm)
                calls[_name][0].extend(requests)
                calls[_name][1].extend(answers)
                return answers
            setattr(lm, name, wrapped)
        return lm

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        # batch 1: HFLM left-pads a batch of GSM8K prompts, which moves the random tiny model's near-tied logits
        # enough to change a greedy pick; one sequence at a time is what llama.cpp runs too
        result = accuracy.run(torch_model, tok, eval_cfg(batch_size=1), "cpu", random_weights=True,
                              make_lm=recording_hflm)
    finally:
        mp.undo()
    return calls, result


def _adapter(tiny_gguf, name, **kw):
    from qbench.methods._llamacpp_lm import LlamaCppLMEval

    _, tok, ggufs = tiny_gguf
    return LlamaCppLMEval(ggufs[name], tok, **kw)


def test_f32_gguf_loglikelihoods_match_torch_fp32_and_q8_0_stays_close(tiny_gguf, recorded):
    requests, torch_ll = recorded[0]["loglikelihood"]
    assert len(requests) == 2 * 2 * 4  # 2 subjects x 2 items x 4 choices
    f32 = _adapter(tiny_gguf, "f32").loglikelihood(requests)
    q8 = _adapter(tiny_gguf, "q8_0").loglikelihood(requests)
    for (t, t_greedy), (f, f_greedy), (q, _) in zip(torch_ll, f32, q8):
        assert f == pytest.approx(t, abs=2e-3), "same weights, same tokens: the runtimes agree"
        assert f_greedy == t_greedy
        assert q == pytest.approx(t, abs=0.05 + 0.02 * abs(t)), "8.5-bit weights move a log-prob a little"
    assert [f for f, _ in f32] != [q for q, _ in q8], "Q8_0 is not the f32 file"


def test_shared_prefixes_are_computed_once(tiny_gguf, recorded):
    requests, _ = recorded[0]["loglikelihood"]
    lm = _adapter(tiny_gguf, "f32")
    lm.loglikelihood(requests)
    # four choices share their question, a subject's questions share its five few-shot examples
    assert lm.tokens_computed < 0.5 * lm.tokens_requested, lm.qbench_settings()
    assert lm.qbench_settings()["requests"]["loglikelihood"] == len(requests)


def test_greedy_generation_matches_torch_and_stops_at_until(tiny_gguf, recorded):
    from lm_eval.api.instance import Instance

    requests, torch_text = recorded[0]["generate_until"]
    lm = _adapter(tiny_gguf, "f32")
    assert lm.generate_until(requests) == torch_text, "greedy on near-identical logits: the same text"
    context = requests[0].args[0]
    free = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 8}), 0)])[0]
    assert len(free) > 4, free
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 8}), 0)])[0]
    assert cut == free.split(stop)[0] and len(cut) < len(free)
    with pytest.raises(ValueError, match="greedy decoding only"):
        lm.generate_until([Instance("generate_until", {}, (context, {"do_sample": True, "temperature": 0.7}), 0)])


def test_context_cap_is_recorded_and_warned(tiny_gguf, recorded):
    requests, _ = recorded[0]["loglikelihood"]
    lm = _adapter(tiny_gguf, "f32", max_length_tokens=2 * CTX)
    assert lm.max_length == CTX  # the llama.cpp context the model was loaded with
    short = _adapter(tiny_gguf, "f32")
    short._max_length = 64  # as if method.n_ctx_tokens were 64: every 5-shot MMLU prompt is longer
    short.loglikelihood(requests)
    assert short.truncated["loglikelihood"] == len(requests)
    assert len(short.qbench_warnings) == 1 and "method.n_ctx_tokens" in short.qbench_warnings[0]


def test_accuracy_run_through_the_gguf_hook(tiny_gguf, recorded):
    """What a gguf cell runs: accuracy.run with the method's lm_eval_model hook; same MMLU picks as torch."""
    from qbench import methods

    _, tok, ggufs = tiny_gguf
    res = accuracy.run(ggufs["f32"], tok, eval_cfg(), "cpu", random_weights=True,
                       make_lm=methods.get("gguf").lm_eval_model)
    torch_res = recorded[1]
    assert res["tasks"]["mmlu"]["n_items"] == 4 and res["tasks"]["gsm8k"]["n_items"] == 2
    assert res["items"]["mmlu"]["predictions"] == torch_res["items"]["mmlu"]["predictions"]
    assert res["items"]["gsm8k"]["predictions"] == torch_res["items"]["gsm8k"]["predictions"]
    assert res["settings"]["lm_eval_model"]["decoding"] == "greedy"
    assert "lm_eval_model" not in torch_res["settings"]
