"""Quality against the baseline, token by token: KL divergence, top-1 agreement, Δp, perplexity ratio.

The measures and their conventions are llama.cpp's ``llama-perplexity --kl-divergence`` (tools/perplexity) and
Dutta et al. 2024, "Accuracy is Not All You Need" (KL divergence and flips beside accuracy):

- the corpus is tokenized once and cut into non-overlapping windows of ``ctx_tokens``; the first token of each
  window becomes BOS where the tokenizer adds one; only the second half of each window is scored (positions
  ``ctx/2 .. ctx-2`` predicting the next token), so every scored token has at least ctx/2 tokens of context;
- per scored token: KL(P_base ‖ Q) over the vocabulary, whether argmax Q == argmax P ("same top p"),
  Δp = Q(correct token) − P(correct token), and both negative log-likelihoods.

One process per cell: the baseline cell cannot hold the other methods' models, and they cannot hold it. So
every cell writes its own next-token distributions compactly (``quality_logprobs.npz`` beside its result): per
scored position, the most likely tokens until they cover ``coverage`` of the probability (no cap by default;
``max_kept`` caps the count where storage matters more), with exact fp32 log-probabilities, plus the correct
token's log-probability and the argmax. A cell that finds its baseline's file compares its *live*
full-vocabulary distribution against it; a cell measured before its baseline gets its comparison from the two
files at the end of the qbench command that finds both (qbench/run/settle.py; "report-time" below, where it was
made before), and so keeps a tail a hundred times thinner (``report_coverage``) to make that comparison as exact as
the live one.

Windows are scored one per forward pass by default (``batch_size: 1``): they are all ``ctx_tokens`` long, so no
padding enters, but some kernels still depend on the batch: LLM.int8 (bnb_int8) picks its fp16 outlier columns
over every row of the batch, and bf16/fp16 GEMMs pick other reductions for other shapes. A cell's figures then
depend on its neighbours in the batch; at batch 1 they do not. The batch size is part of the baseline match
(``_identity``): a baseline scored at another batch size is refused with a warning, never compared silently.

Approximations, each tested against the exact full-vocabulary KL (tests/test_quality.py):

1. The baseline's unkept tokens form one bucket: KL is computed between the distributions coarsened to
   {kept tokens} ∪ {rest}. By the data-processing inequality this is a lower bound of the full KL; it misses at
   most P(rest) × KL between the two tails, and P(rest) ≤ 1 − coverage at every position unless a ``max_kept``
   set by the user binds (then ``kept_mass_min`` < coverage, the cell warns and the report flags it).
   llama.cpp makes the same kind of cut: it skips base tokens with log p < −16.
2. Only in the report-time comparison: the tokens both files kept are compared one by one, everything else
   is one bucket whose two masses both files give exactly. Again a lower bound, with no value guessed. The
   cell that waits for the report kept tokens to ``report_coverage`` (a tail 100 times smaller), so the baseline's
   kept tokens are nearly all among its own and this path reads as close to the exact KL as the live one.
3. Perplexity, Δp and top-1 agreement are exact in both paths (the correct token and the argmax are stored).

Measured on SmolLM2-135M (tiny_text, 4 windows of 256, vs fp32; docs/results.md#quality): the live path reads
0.17-0.24 % below the exact full-vocabulary KL, the report-time path 0.17-0.24 % (0.23-0.72 % before, with
``max_kept`` 4096 and one coverage for every cell).

A figure that is not finite (NaN logits, a probability of 0 where the baseline has mass) is recorded with why,
in ``nonfinite``: result.json stores NaN as null, and a null alone would not say whether the method broke.

Uncertainty: tokens of one window are correlated, so every 95 % CI is a t-interval over per-window means
(W windows, W − 1 degrees of freedom), wider and more honest than llama.cpp's token-level ± (also recorded
as ``*_se_tokens``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from qbench.store.layout import LOGPROBS_FILE  # the run folder's file names have one owner

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A cell measured before its baseline keeps REPORT_TAIL_FACTOR times less unkept probability than ``coverage``
# leaves: the report-time comparison only sees tokens both files kept (approximation 2 of the docstring).
REPORT_TAIL_FACTOR = 100
# Kept mass is summed in float64 from fp32 log-probabilities: below coverage by more than this, the cap cut it.
KEPT_MASS_TOLERANCE = 1e-6
KL_PERCENTILES = (50, 90, 99, 99.9)
# compact(): tokens taken per position by the first pass; positions it leaves short of coverage are sorted in full.
# Any value keeps the same tokens; this one is the fastest measured: SmolLM2-135M on tiny_text keeps a median of
# 1,068 tokens (mean 2,116) at coverage 0.999 and 18 % of positions need more than 4,096. One 255-position window
# on the 2-core CPU: 0.21 s, against 1.4-2.9 s for a full sort (0.40 s with 1,024, 0.46 s with 256).
FIRST_PASS_TOKENS = 4096
DP_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


# ------------------------------------------------------------------------------------------------ corpus
def corpus_windows(tokenizer: Any, text: str, ctx_tokens: int, max_windows: Optional[int]) -> np.ndarray:
    """[W, ctx] token ids: the corpus tokenized once, cut into non-overlapping windows (remainder dropped)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    n = len(ids) // ctx_tokens
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise ValueError(f"quality: the corpus has {len(ids)} tokens, fewer than one window of {ctx_tokens}")
    windows = np.asarray(ids[: n * ctx_tokens], dtype=np.int64).reshape(n, ctx_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and tokenizer("x").input_ids[:1] == [bos]:
        windows[:, 0] = bos  # llama.cpp: where the tokenizer adds BOS, every chunk starts with it
    return windows


def scored_positions(ctx_tokens: int) -> Tuple[int, int]:
    """(first, count): logits at positions first .. ctx-2 predict tokens first+1 .. ctx-1 (llama.cpp)."""
    first = ctx_tokens // 2
    return first, ctx_tokens - 1 - first


def window_logprobs(model: Any, windows: np.ndarray, batch_size: int) -> Iterator[Tuple[int, Any]]:
    """(window index, [count, V] float32 log-softmax at the scored positions) for every window, in order.

    The log-probs stay on the model's device: compacting them (a sort over the vocabulary per position) and the
    live comparison run there, and only the kept tokens cross to the host. On a GPU that was 18-26 s of every
    135M cell's quality phase (H200, 32 windows: a CPU sort of 256 x 49,152 per window), now well under one."""
    import torch

    first, count = scored_positions(windows.shape[1])
    dev = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = torch.as_tensor(windows[start:start + batch_size], device=dev)
            logits = model(batch).logits[:, first:first + count]
            logp = torch.log_softmax(logits.float(), dim=-1)
            if dev.type == "cuda":  # the forward's seconds stay the forward's in the budget (compacting syncs anyway)
                torch.cuda.synchronize(dev)
            for j in range(logp.shape[0]):
                yield start + j, logp[j]


# ------------------------------------------------------------------------------------------------ compact form
def report_coverage(coverage: float) -> float:
    """The coverage a cell keeps when its comparison waits for the report (see REPORT_TAIL_FACTOR)."""
    return 1.0 - (1.0 - float(coverage)) / REPORT_TAIL_FACTOR


def compact(logp: Any, coverage: float, max_kept: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_kept [P], ids [sum], logp [sum]) of one window's [P, V] log-probs, most likely first.

    ``max_kept`` None: no cap, every position keeps tokens until ``coverage`` (the stated bound always holds)."""
    import torch

    k = logp.shape[-1] if max_kept is None else min(int(max_kept), logp.shape[-1])
    # A sort over the whole vocabulary per position is the cost here; most positions reach coverage within a
    # few thousand tokens, so the first pass takes the top FIRST_PASS_TOKENS and only the positions it leaves short
    # are sorted in full. The kept tokens and their order are those of the full sort (ties aside: equal
    # log-probs, so every figure is the same).
    k0 = min(k, FIRST_PASS_TOKENS)
    top_lp, top_ids = torch.topk(logp, k0, dim=-1)
    cum = torch.cumsum(top_lp.double().exp(), dim=-1)
    # tokens until the cumulative probability reaches coverage (the one that crosses it included)
    n_kept = torch.clamp((cum < coverage).sum(dim=-1) + 1, max=k0)
    short = (cum[:, -1] < coverage).nonzero().flatten() if k0 < k else n_kept[:0]
    if len(short):
        full_lp, full_ids = torch.topk(logp[short], k, dim=-1)
        full_cum = torch.cumsum(full_lp.double().exp(), dim=-1)
        n_kept[short] = torch.clamp((full_cum < coverage).sum(dim=-1) + 1, max=k)
        width = int(n_kept.max())
        lp_all = torch.zeros(logp.shape[0], width, dtype=logp.dtype, device=logp.device)
        ids_all = torch.zeros(logp.shape[0], width, dtype=top_ids.dtype, device=logp.device)
        lp_all[:, :k0], ids_all[:, :k0] = top_lp[:, :width], top_ids[:, :width]
        lp_all[short], ids_all[short] = full_lp[:, :width], full_ids[:, :width]
        top_lp, top_ids = lp_all, ids_all
    mask = torch.arange(top_lp.shape[1], device=logp.device)[None, :] < n_kept[:, None]
    return (n_kept.cpu().numpy().astype(np.int32), top_ids[mask].cpu().numpy().astype(np.int32),
            top_lp[mask].cpu().numpy())


class Recorder:
    """Collects one cell's compact distributions window by window, then writes them as one .npz."""

    def __init__(self, windows: np.ndarray, coverage: float, max_kept: Optional[int]):
        self.windows, self.coverage, self.max_kept = windows, coverage, max_kept
        self.parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("n_kept", "ids", "logp", "logp_target",
                                                                   "argmax", "window")}

    def add(self, w: int, logp: Any) -> None:
        first, count = scored_positions(self.windows.shape[1])
        targets = self.windows[w, first + 1:first + 1 + count]
        n_kept, ids, lp = compact(logp, self.coverage, self.max_kept)
        self.parts["n_kept"].append(n_kept)
        self.parts["ids"].append(ids)
        self.parts["logp"].append(lp)
        self.parts["logp_target"].append(_at(logp, np.arange(count), targets))
        self.parts["argmax"].append(logp.argmax(dim=-1).cpu().numpy().astype(np.int32))
        self.parts["window"].append(np.full(count, w, dtype=np.int32))

    def arrays(self) -> Dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}

    def write(self, path: Path, meta: Dict[str, Any]) -> None:
        """One uncompressed .npz, kept token ids as uint16 where the vocabulary allows: zlib was most of a cell's
        quality phase (SmolLM2-135M, 8 windows of 512 tokens, this 2-core CPU: 33 s with it, 15 s without) for a
        file 16 % smaller (165 MB against 196 MB); docs/quality.md."""
        arrays = self.arrays()
        if meta.get("vocab_size") is not None and int(meta["vocab_size"]) <= np.iinfo(np.uint16).max + 1:
            arrays["ids"] = arrays["ids"].astype(np.uint16)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, tokens=self.windows.astype(np.int32), meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none


def load(path: Path) -> Optional[Dict[str, Any]]:
    """A cell's compact distributions (arrays plus ``meta``), or None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    data["meta"] = json.loads(str(data["meta"]))
    data["ids"] = data["ids"].astype(np.int32, copy=False)  # uint16 on disk where the vocabulary fits (Recorder.write)
    data["offsets"] = np.concatenate([[0], np.cumsum(data["n_kept"], dtype=np.int64)])
    return data


def tokens_hash(windows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int32).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ comparison
def _kl_coarsened(lp_kept: np.ndarray, lq_kept: np.ndarray) -> float:
    """KL(P‖Q) over the baseline's kept tokens plus one bucket for the rest (float64)."""
    p = np.exp(lp_kept.astype(np.float64))
    lq = lq_kept.astype(np.float64)
    kl = float(np.sum(p * (lp_kept - lq)))
    p_rest = 1.0 - p.sum()
    if p_rest > 1e-12:
        q_rest = max(1.0 - np.exp(lq).sum(), 1e-300)
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return kl


def _at(logp: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """logp[rows, cols] as a float32 host array, gathered where logp lives (only these values cross)."""
    import torch

    index = (torch.as_tensor(rows, device=logp.device), torch.as_tensor(cols, device=logp.device, dtype=torch.long))
    return logp[index].cpu().numpy()


def _kl_coarsened_rows(lp_kept: np.ndarray, lq_kept: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """:func:`_kl_coarsened` of many positions at once: the kept tokens of position j are
    ``[starts[j], starts[j + 1])`` of the flat arrays (every position keeps at least one)."""
    lp = lp_kept.astype(np.float64)
    p = np.exp(lp)
    lq = lq_kept.astype(np.float64)
    kl = np.add.reduceat(p * (lp - lq), starts)
    p_rest = 1.0 - np.add.reduceat(p, starts)
    q_rest = np.maximum(1.0 - np.add.reduceat(np.exp(lq), starts), 1e-300)
    tail = p_rest > 1e-12
    kl[tail] += p_rest[tail] * (np.log(p_rest[tail]) - np.log(q_rest[tail]))
    return kl


def compare_live(ref: Dict[str, Any], w: int, logq: Any, window_rows: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-token measures of one window: the cell's full [count, V] log-probs (on any device) against the
    stored baseline; only the cell's log-probs at the baseline's kept tokens leave the device."""
    offsets = ref["offsets"]
    a, b = offsets[window_rows[0]], offsets[window_rows[-1] + 1]  # a window's positions are consecutive rows
    n_kept = ref["n_kept"][window_rows]
    lq_kept = _at(logq, np.repeat(np.arange(len(window_rows)), n_kept), ref["ids"][a:b])
    kl = _kl_coarsened_rows(ref["logp"][a:b], lq_kept, offsets[window_rows] - a)
    first, count = scored_positions(ref["tokens"].shape[1])
    targets = ref["tokens"][w, first + 1:first + 1 + count]
    argmax = logq.argmax(dim=-1).cpu().numpy()
    return {"kl": kl, "same_top": argmax == ref["argmax"][window_rows],
            "logq_target": _at(logq, np.arange(count), targets), "logp_target": ref["logp_target"][window_rows]}


def compare_files(ref: Dict[str, Any], cand: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Per-token measures from two compact files (approximation 2 of the module docstring)."""
    n_pos = len(ref["n_kept"])
    kl = np.empty(n_pos)
    for n in range(n_pos):
        a, b = ref["offsets"][n], ref["offsets"][n + 1]
        c, d = cand["offsets"][n], cand["offsets"][n + 1]
        _, i_ref, i_cand = np.intersect1d(ref["ids"][a:b], cand["ids"][c:d], return_indices=True)
        kl[n] = _kl_coarsened(ref["logp"][a:b][i_ref], cand["logp"][c:d][i_cand])
    return {"kl": kl, "same_top": cand["argmax"] == ref["argmax"],
            "logq_target": cand["logp_target"], "logp_target": ref["logp_target"]}


# ------------------------------------------------------------------------------------------------ statistics
def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def window_mean_ci(values: np.ndarray, window: np.ndarray) -> Dict[str, Optional[float]]:
    """Mean over tokens, with a 95 % t-interval over per-window means and llama.cpp's token-level se."""
    values = np.asarray(values, dtype=np.float64)
    means = np.array([values[window == w].mean() for w in np.unique(window)])
    out: Dict[str, Optional[float]] = {"mean": float(values.mean()), "ci95_low": None, "ci95_high": None,
                                       "n_windows": int(len(means)), "n_tokens": int(len(values)),
                                       "se_tokens": float(values.std(ddof=1) / math.sqrt(len(values)))
                                       if len(values) > 1 else None}
    if len(means) > 1:
        half = _t975(len(means) - 1) * means.std(ddof=1) / math.sqrt(len(means))
        out["ci95_low"], out["ci95_high"] = float(means.mean() - half), float(means.mean() + half)
    return out


def _percentiles(values: np.ndarray, qs: Tuple[float, ...]) -> Dict[str, float]:
    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs}


def summarize(per_token: Dict[str, np.ndarray], window: np.ndarray) -> Dict[str, Any]:
    """The comparison block of result.json (docs/results.md, metrics.quality.comparison)."""
    kl, same = per_token["kl"], per_token["same_top"].astype(np.float64)
    nll_q, nll_p = -per_token["logq_target"].astype(np.float64), -per_token["logp_target"].astype(np.float64)
    dp = np.exp(-nll_q) - np.exp(-nll_p)
    ln_ratio = window_mean_ci(nll_q - nll_p, window)
    ratio = {k: (math.exp(v) if k in ("mean", "ci95_low", "ci95_high") and v is not None else v)
             for k, v in ln_ratio.items() if k != "se_tokens"}
    return {
        "kl_divergence": {**window_mean_ci(kl, window), **_percentiles(kl, KL_PERCENTILES),
                          "max": float(kl.max()), "unit": "nats per token"},
        "top1_agreement_pct": {k: (100 * v if isinstance(v, float) else v)
                               for k, v in window_mean_ci(same, window).items()},
        "delta_p_pct": {"mean": float(100 * dp.mean()), "rms": float(100 * math.sqrt(np.mean(dp ** 2))),
                        **{k: 100 * v for k, v in _percentiles(dp, DP_PERCENTILES).items()},
                        "min": float(100 * dp.min()), "max": float(100 * dp.max()),
                        "unit": "percentage points of the correct token's probability"},
        "ln_ppl_ratio": ln_ratio,
        "ppl_ratio": ratio,
        "ppl": math.exp(nll_q.mean()), "ppl_baseline": math.exp(nll_p.mean()),
        "nll_correlation": float(np.corrcoef(nll_q, nll_p)[0, 1]) if nll_q.std() > 0 and nll_p.std() > 0 else None,
    }


# ------------------------------------------------------------------------------------------------ one cell
# What must match between a baseline's file and a cell for their distributions to be compared: the exact token
# windows, the model, and the batch size (LLM.int8 and bf16 kernels give other logits at another batch size).
IDENTITY_KEYS = ("tokens_sha256", "model_config_hash", "ctx_tokens", "batch_size")


def _identity(meta: Dict[str, Any]) -> Tuple[Any, ...]:
    # a file written before the batch size was recorded holds None there: it matches no new file
    return tuple(meta.get(k) for k in IDENTITY_KEYS)


def identity_mismatch(ref_meta: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
    """The identity keys whose values differ, each as ``key baseline → cell``."""
    return [f"{k} {a} \u2192 {b}" for k, a, b in zip(IDENTITY_KEYS, _identity(ref_meta), _identity(meta)) if a != b]


def usable_reference(path: Path, meta: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The baseline's file when it was made on the same tokens by the same model config, else (None, why)."""
    if not path.exists():
        return None, None
    ref = load(path)
    if ref is None:
        return None, f"quality: the baseline's {path} is unreadable"
    differ = identity_mismatch(ref["meta"], meta)
    if differ:
        return None, (f"quality: the baseline's {path} was made on other tokens, another model config or another "
                      f"batch size ({', '.join(differ)}); rerun the baseline cell (run.force=true) with the same "
                      "eval.quality settings to compare against it")
    return ref, None


def own_summary(arrays: Dict[str, np.ndarray], coverage: float) -> Dict[str, Any]:
    """The cell's own perplexity (with its CI) and how much probability its stored tokens cover."""
    nll = window_mean_ci(-arrays["logp_target"].astype(np.float64), arrays["window"])
    offsets = np.concatenate([[0], np.cumsum(arrays["n_kept"], dtype=np.int64)])
    kept_mass = np.add.reduceat(np.exp(arrays["logp"].astype(np.float64)), offsets[:-1])
    finite = kept_mass[np.isfinite(kept_mass)]
    return {
        "ppl": math.exp(nll["mean"]) if math.isfinite(nll["mean"]) else float("nan"),
        "ppl_ci95_low": None if nll["ci95_low"] is None else math.exp(nll["ci95_low"]),
        "ppl_ci95_high": None if nll["ci95_high"] is None else math.exp(nll["ci95_high"]),
        "nll_mean": nll["mean"], "n_tokens": nll["n_tokens"], "n_windows": nll["n_windows"],
        "kept_tokens_mean": float(arrays["n_kept"].mean()),
        "kept_mass_mean": float(finite.mean()) if len(finite) else None,
        "kept_mass_min": float(finite.min()) if len(finite) else None,
        # positions where max_kept cut before coverage: there the bucket bound P(rest) <= 1 - coverage fails
        "kept_below_coverage": int(np.sum(finite < coverage - KEPT_MASS_TOLERANCE)),
    }


def _where(bad: np.ndarray, window: np.ndarray) -> str:
    return f"{int(bad.sum())} of {len(bad)} scored positions (first in window {int(window[np.argmax(bad)])})"


def nonfinite_reasons(arrays: Dict[str, np.ndarray], per_token: Optional[Dict[str, np.ndarray]]) -> Dict[str, str]:
    """Why a figure is not finite, per figure (``ppl``, ``kl``), in one line each; {} when all are finite.

    NaN logits (or +inf, which log-softmax turns into NaN) make every log-probability of the position NaN; a
    probability of exactly 0 for the correct token makes its NLL infinite; a cell probability of 0 where the
    baseline has mass makes KL infinite."""
    window, out = arrays["window"], {}
    lp = arrays["logp_target"]
    nan_pos = np.isnan(lp)
    zero_pos = np.isneginf(lp)
    if nan_pos.any():
        out["ppl"] = f"NaN or infinite logits at {_where(nan_pos, window)}"
    elif zero_pos.any():
        out["ppl"] = f"probability 0 for the correct token at {_where(zero_pos, window)}"
    if per_token is not None:
        kl = per_token["kl"]
        cand_nan = np.isnan(per_token["logq_target"])
        if cand_nan.any():
            out["kl"] = f"NaN or infinite logits in this cell at {_where(cand_nan, window)}"
        elif np.isnan(kl).any():
            out["kl"] = f"NaN or infinite logits in the baseline at {_where(np.isnan(kl), window)}"
        elif np.isinf(kl).any():
            out["kl"] = (f"probability 0 for tokens the baseline gives mass to at {_where(np.isinf(kl), window)}")
    return out


def _cap_warning(own: Dict[str, Any], coverage: float, max_kept: Optional[int]) -> Optional[str]:
    if not own["kept_below_coverage"]:
        return None
    return (f"quality: eval.quality.max_kept={max_kept} stopped {own['kept_below_coverage']} of {own['n_tokens']} "
            f"positions before coverage {coverage:g} (kept mass down to {own['kept_mass_min']:.4f}): KL there is a "
            "looser lower bound than the stated one; unset max_kept (null) to keep every position to coverage")


def run(model: Any, tokenizer: Any, q_cfg: Any, *, text: str, cell_dir: Path, baseline_file: Optional[Path],
        meta: Dict[str, Any]) -> Dict[str, Any]:
    """The ``quality`` section of one cell; writes its compact distributions to ``cell_dir/LOGPROBS_FILE``.

    ``baseline_file`` is None for the baseline cell itself, else where the baseline's file is (or will be).
    """
    t0 = time.perf_counter()
    spent = dict.fromkeys(TIME_PARTS, 0.0)  # where the phase's seconds went (the cell's budget splits quality_s)
    windows = corpus_windows(tokenizer, text, int(q_cfg.ctx_tokens), q_cfg.max_windows)
    max_kept = None if q_cfg.get("max_kept") is None else int(q_cfg.max_kept)
    meta = {**meta, "format": FORMAT_VERSION, "ctx_tokens": int(q_cfg.ctx_tokens), "n_windows": len(windows),
            "tokens_sha256": tokens_hash(windows), "batch_size": int(q_cfg.batch_size), "max_kept": max_kept,
            "coverage": float(q_cfg.coverage), "vocab_size": None}
    t = _lap(spent, "text_s", t0)
    ref, warning = None, None
    if baseline_file is not None:
        ref, warning = usable_reference(baseline_file, meta)
        _lap(spent, "baseline_read_s", t)
    # a compared cell without a usable baseline is compared later from the files: it keeps a thinner tail for that
    if baseline_file is not None and ref is None:
        meta["coverage"] = report_coverage(q_cfg.coverage)
    recorder = Recorder(windows, meta["coverage"], max_kept)
    live: List[Dict[str, np.ndarray]] = []
    _, count = scored_positions(windows.shape[1])
    t = time.perf_counter()
    for w, logp in window_logprobs(model, windows, int(q_cfg.batch_size)):
        t = _lap(spent, "model_calls_s", t)  # the generator's forward (and its sync), between two windows
        meta["vocab_size"] = int(logp.shape[-1])
        recorder.add(w, logp)
        t = _lap(spent, "record_s", t)
        if ref is not None:
            live.append(compare_live(ref, w, logp, np.arange(w * count, (w + 1) * count)))
            t = _lap(spent, "compare_s", t)
    t = _lap(spent, "model_calls_s", t)  # the generator's end
    cell_dir.mkdir(parents=True, exist_ok=True)
    recorder.write(cell_dir / LOGPROBS_FILE, meta)
    _lap(spent, "write_s", t)
    arrays = recorder.arrays()
    comparison, per_token = None, None
    if live:
        per_token = {k: np.concatenate([x[k] for x in live]) for k in live[0]}
        comparison = summarize(per_token, arrays["window"])
    own = own_summary(arrays, meta["coverage"])
    warnings = [w for w in (warning, _cap_warning(own, meta["coverage"], max_kept)) if w]
    nonfinite = nonfinite_reasons(arrays, per_token)
    if comparison is not None and "kl" in nonfinite:
        comparison["nonfinite"] = nonfinite["kl"]  # where the report-time path puts it too
    warnings += [f"quality: {k} not finite: {why}" for k, why in nonfinite.items()]
    return {
        "role": "baseline" if baseline_file is None else "compared",
        "baseline_file": None if baseline_file is None else str(baseline_file),
        **own,
        "comparison": comparison,
        "comparison_source": "live" if comparison else None,
        "nonfinite": nonfinite,
        "settings": {k: meta[k] for k in ("source", "ctx_tokens", "n_windows", "tokens_sha256", "coverage",
                                          "max_kept", "vocab_size", "batch_size") if k in meta}
                    | {"scored": "second half of each window (llama.cpp)"},
        "warnings": warnings,
        "eval_time_s": time.perf_counter() - t0,
        "time_parts_s": spent,
    }


# The quality phase's parts (quality.run's "time_parts_s", which the cell pops into its budget as quality_<part>):
# reading the baseline's file, compacting and writing this cell's, and tokenizing the text measure nothing.
TIME_PARTS = ("text_s", "baseline_read_s", "model_calls_s", "record_s", "compare_s", "write_s")


def _lap(spent: Dict[str, float], part: str, since: float) -> float:
    now = time.perf_counter()
    spent[part] += now - since
    return now


def compare_later(cell_dir: Path, baseline_dir: Path) -> Optional[Dict[str, Any]]:
    """The comparison of a cell measured before its baseline, from the two files; None if either is missing or
    they were not made on the same tokens, model config and batch size."""
    cand = load(cell_dir / LOGPROBS_FILE)
    ref = load(baseline_dir / LOGPROBS_FILE)
    if cand is None or ref is None or identity_mismatch(ref["meta"], cand["meta"]):
        return None
    per_token = compare_files(ref, cand)
    comparison = summarize(per_token, ref["window"])
    reasons = nonfinite_reasons(cand, per_token)
    if "kl" in reasons:
        comparison["nonfinite"] = reasons["kl"]
    return comparison
