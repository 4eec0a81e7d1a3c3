"""qbench's KL divergence for a GGUF cell against llama.cpp's own ``llama-perplexity --kl-divergence``, on the same
tokens, the same context and the same scored positions.

    python scripts/gguf_kld_check.py BASE.gguf QUANT.gguf [--text FILE] [--ctx 256] [--chunks 16] [--threads 1]
                                     [--json OUT.json]

1. llama-perplexity (built by ``make llama-tools``) runs BASE with ``--kl-divergence-base``: it tokenizes FILE its
   own way (BOS first where the vocabulary adds one), cuts ``--chunks`` chunks of ``--ctx`` tokens, and saves the
   tokens and, for the second half of each chunk, BASE's log-probabilities (as uint16 over the top 16 nats).
2. llama-perplexity runs QUANT with ``--kl-divergence`` against that file: its mean KLD, "same top p" and PPLs.
3. qbench reads the very tokens from that file (so no tokenizer can differ), makes each chunk's first token BOS
   where the vocabulary adds one (as llama-perplexity does), runs BASE and QUANT in llama.cpp through qbench's
   runtime (qbench/methods/_llamacpp.py) and scores them with qbench's quality code (qbench/evaluate/quality.py:
   the same positions ctx/2 .. ctx-2, the baseline kept to ``coverage``, KL/top-1/perplexity, 95 % CIs over
   chunks), plus the exact full-vocabulary KL in float64 as a third figure.

The figures differ only by how each side stores the base distribution: llama.cpp rounds base log-probs to 16 bits
and skips base tokens below -16 nats; qbench keeps the base's likeliest tokens to ``coverage`` exactly and lumps
the rest. Both are lower bounds of the exact KL up to that rounding.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qbench.evaluate import quality  # noqa: E402
from qbench.methods import _llamacpp as lc  # noqa: E402

DEFAULT_TEXT = ROOT / "qbench" / "data" / "tiny_text.txt"  # builtin:tiny_text, qbench's default quality corpus


# ------------------------------------------------------------------------------------------------ llama.cpp side
def _value(pattern: str, text: str) -> Tuple[float, float]:
    """(value, its ±) of one line of llama-perplexity's final statistics."""
    found = re.search(pattern + r"\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)", text)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no '{pattern}' line (fewer than 100 scored tokens?)")
    return float(found.group(1)), float(found.group(2))


def llama_perplexity(base: Path, quant: Path, text: Path, ctx: int, chunks: int, threads: int,
                     work: Path) -> Dict[str, Any]:
    """Both llama-perplexity runs; their final statistics, and where the base file is."""
    base_file, log = work / "base.kld", work / "llama-perplexity.log"
    common = ["-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), "-ngl", "0"]
    lc.run_tool("llama-perplexity", ["-m", str(base), "-f", str(text), *common, "--kl-divergence-base",
                                     str(base_file)], log)
    out = lc.run_tool("llama-perplexity", ["-m", str(quant), *common, "--kl-divergence-base", str(base_file),
                                           "--kl-divergence"], log)
    kld, kld_se = _value(r"Mean\s+KLD", out)
    top, top_se = _value(r"Same top p", out)
    ppl, ppl_se = _value(r"Mean PPL\(Q\)", out)
    ppl_base, _ = _value(r"Mean PPL\(base\)", out)
    return {"kl_mean": kld, "kl_se": kld_se, "top1_pct": top, "top1_se_pct": top_se, "ppl": ppl, "ppl_se": ppl_se,
            "ppl_base": ppl_base, "base_file": str(base_file), "log": str(log)}


def read_tokens(base_file: Path) -> Tuple[np.ndarray, int]:
    """([chunks, ctx] token ids, n_vocab) from llama-perplexity's --kl-divergence-base file: "_logits_", then
    uint32 n_ctx, int32 n_vocab, int32 n_chunk, then n_chunk * n_ctx int32 tokens (tools/perplexity)."""
    with open(base_file, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{base_file} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(12), dtype="<i4"))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4")
    return tokens.reshape(n_chunk, n_ctx).astype(np.int64), n_vocab


# ------------------------------------------------------------------------------------------------ qbench side
def qbench_kld(base: Path, quant: Path, tokens: np.ndarray, threads: int, coverage: float) -> Dict[str, Any]:
    """qbench's comparison of QUANT against BASE on ``tokens`` (one chunk per row), both run in llama.cpp."""
    ctx = tokens.shape[1]
    models = [lc.LlamaCppLM(p, ctx, threads, ctx) for p in (base, quant)]
    windows = tokens.copy()
    add_bos = str(models[0].metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    if add_bos:
        windows[:, 0] = models[0].token_bos  # llama-perplexity puts BOS first in every chunk
    _, count = quality.scored_positions(ctx)
    recorder = quality.Recorder(windows, coverage, None)
    live, exact = [], []
    for (w, logp), (_, logq) in zip(quality.window_logprobs(models[0], windows, 1),
                                    quality.window_logprobs(models[1], windows, 1)):
        recorder.add(w, logp)
        ref = {**recorder.arrays(), "tokens": windows}
        ref["offsets"] = np.concatenate([[0], np.cumsum(ref["n_kept"], dtype=np.int64)])
        live.append(quality.compare_live(ref, w, logq, np.arange(w * count, (w + 1) * count)))
        p64, q64 = logp.double(), logq.double()
        exact.append((p64.exp() * (p64 - q64)).sum(dim=-1).numpy())
    for m in models:
        m.close()
    per_token = {k: np.concatenate([x[k] for x in live]) for k in live[0]}
    window = np.repeat(np.arange(len(windows)), count)
    summary = quality.summarize(per_token, window)
    kl = summary["kl_divergence"]
    return {"kl_mean": kl["mean"], "kl_ci95": [kl["ci95_low"], kl["ci95_high"]], "kl_se_tokens": kl["se_tokens"],
            "kl_exact_mean": float(np.concatenate(exact).mean()), "top1_pct": summary["top1_agreement_pct"]["mean"],
            "top1_ci95_pct": [summary["top1_agreement_pct"]["ci95_low"], summary["top1_agreement_pct"]["ci95_high"]],
            "ppl": summary["ppl"], "ppl_base": summary["ppl_baseline"], "n_tokens": int(len(window)),
            "n_chunks": int(len(windows)), "coverage": coverage, "bos_first": add_bos}


def compare(base: Path, quant: Path, text: Path = DEFAULT_TEXT, ctx: int = 256, chunks: int = 16, threads: int = 1,
            coverage: float = 0.999, work: Path | None = None) -> Dict[str, Any]:
    """Both sides on the same tokens; the differences qbench - llama.cpp (absolute and relative)."""
    with tempfile.TemporaryDirectory(prefix="gguf-kld-") as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        lp = llama_perplexity(base, quant, text, ctx, chunks, threads, work)
        tokens, _ = read_tokens(Path(lp["base_file"]))
        qb = qbench_kld(base, quant, tokens, threads, coverage)
    diff = qb["kl_mean"] - lp["kl_mean"]
    return {"base": str(base), "quant": str(quant), "text": str(text), "ctx_tokens": ctx, "chunks": chunks,
            "llama_perplexity": lp, "qbench": qb, "kl_diff": diff,
            "kl_diff_rel": diff / lp["kl_mean"] if lp["kl_mean"] else math.nan,
            "top1_diff_pct": qb["top1_pct"] - lp["top1_pct"], "llama_cpp_commit": lc.LLAMA_CPP_COMMIT[1]}


def table(r: Dict[str, Any]) -> str:
    """The comparison as a markdown table (docs/gguf.md)."""
    lp, qb = r["llama_perplexity"], r["qbench"]
    lo, hi = qb["kl_ci95"]
    return "\n".join([
        "| measure | llama-perplexity | qbench | qbench - llama.cpp |",
        "|---|---|---|---|",
        f"| mean KLD (nats/token) | {lp['kl_mean']:.6f} ± {lp['kl_se']:.6f} | {qb['kl_mean']:.6f} "
        f"[{lo:.6f}, {hi:.6f}]; exact {qb['kl_exact_mean']:.6f} | {r['kl_diff']:+.6f} ({100 * r['kl_diff_rel']:+.2f} %) |",
        f"| same top-1 (%) | {lp['top1_pct']:.3f} ± {lp['top1_se_pct']:.3f} | {qb['top1_pct']:.3f} | "
        f"{r['top1_diff_pct']:+.3f} |",
        f"| PPL(Q) | {lp['ppl']:.4f} ± {lp['ppl_se']:.4f} | {qb['ppl']:.4f} | {qb['ppl'] - lp['ppl']:+.4f} |",
        f"| PPL(base) | {lp['ppl_base']:.4f} | {qb['ppl_base']:.4f} | {qb['ppl_base'] - lp['ppl_base']:+.4f} |",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="the base GGUF (f32), as in --kl-divergence-base")
    ap.add_argument("quant", type=Path, help="the quantized GGUF compared with it")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text file (default: builtin:tiny_text)")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per chunk (llama-perplexity -c)")
    ap.add_argument("--chunks", type=int, default=16, help="chunks (count)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (count)")
    ap.add_argument("--coverage", type=float, default=0.999, help="qbench's eval.quality.coverage")
    ap.add_argument("--json", type=Path, help="write the whole comparison here")
    args = ap.parse_args(argv)
    for key in ("base", "quant", "text"):
        if not getattr(args, key).is_file():
            print(f"gguf_kld_check: {key}: {getattr(args, key)} is not a file", file=sys.stderr)
            return 2
    r = compare(args.base, args.quant, args.text, args.ctx, args.chunks, args.threads, args.coverage)
    print(table(r))
    print(f"{r['qbench']['n_tokens']} scored tokens, {r['chunks']} chunks of {r['ctx_tokens']}; "
          f"qbench's CI is a 95 % t-interval over chunks, llama.cpp's ± one token-level standard error")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
