"""Perplexity of the loaded model over a text corpus in non-overlapping windows (the GPTQ/AWQ evaluation).

The ``perplexity`` part of result.json's ``accuracy`` section (docs/results.md). ``load_perplexity_text`` also
gives quality.py its corpus (qbench/evaluate/quality.py: the same sources, llama.cpp's windows).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict

TINY_TEXT = Path(__file__).resolve().parents[1] / "data" / "tiny_text.txt"
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")  # GPTQ/AWQ: wikitext-2-raw-v1 test, "\n\n"-joined


def load_perplexity_text(source: str, offline: bool = False) -> str:
    """The corpus: wikitext2 (Hub, test split joined with blank lines), builtin:tiny_text, or a local .txt."""
    if source == "wikitext2":
        if offline:
            raise ValueError("perplexity source wikitext2 is read from the Hub, but evaluation is offline")
        import datasets

        path, name, split = WIKITEXT2
        return "\n\n".join(datasets.load_dataset(path, name, split=split)["text"])
    if source == "builtin:tiny_text":
        return TINY_TEXT.read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"perplexity source '{source}' is not a file")
    return path.read_text(encoding="utf-8")


def perplexity(model: Any, tokenizer: Any, ppl_cfg: Any, offline: bool = False) -> Dict[str, Any]:
    """Perplexity over non-overlapping windows of ``seq_len_tokens`` (the GPTQ/AWQ evaluation).

    The whole corpus is tokenized once (with the tokenizer's special tokens, as GPTQ's script does), cut into
    ``n_tokens // seq_len`` windows (the remainder is dropped), each window scored independently, and
    ppl = exp(total negative log-likelihood / tokens predicted). Every window predicts seq_len - 1 tokens, so
    this equals GPTQ's exp(mean of per-window mean losses).
    """
    import torch

    t0 = time.perf_counter()
    seq_len = int(ppl_cfg.seq_len_tokens)
    text = load_perplexity_text(ppl_cfg.source, offline=offline)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seq_len
    if ppl_cfg.max_windows is not None:
        n_windows = min(n_windows, int(ppl_cfg.max_windows))
    if n_windows == 0:
        raise ValueError(f"perplexity: the corpus has {ids.numel()} tokens, fewer than one window of {seq_len}")
    dev = next(model.parameters()).device
    nll = 0.0
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0).to(dev)
            logits = model(window).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:].to(logits.device), reduction="sum"))
    predicted = n_windows * (seq_len - 1)
    return {
        "source": ppl_cfg.source,
        "seq_len_tokens": seq_len,
        "n_windows": n_windows,
        "n_tokens": predicted,
        "n_tokens_corpus": int(ids.numel()),
        "value": math.exp(nll / predicted),
        "eval_time_s": time.perf_counter() - t0,
    }
