"""Does greedy generation repeat on a GPU, in one process and between processes? (issue 28, item 4)

Two runs of one eval cell on an H100 (the 8B shape with random weights, bf16, GSM8K at batch 128, 256 tokens)
wrote different answers for most of 167 problems, though the requests were the same texts in the same order
(tests/test_task_cache.py). This probe asks where that comes from, without lm-eval: a model with random weights
made from one seed on the GPU (the same weights in every process: checked by a checksum), a batch of left-padded
random prompts of mixed lengths as lm-eval batches them, greedy generation at a fixed length (EOS disabled),
three times in a process; and each step's gap between the top two logits against bf16's spacing at the top logit
(a gap below it is a tie that any rounding difference may flip).

    python scripts/probe_generation_repeats.py run A            # writes $OUT/tokens_A.pt, prints in-process repeats
    python scripts/probe_generation_repeats.py run B            # another process, same everything
    python scripts/probe_generation_repeats.py run C --deterministic  # and CUBLAS_WORKSPACE_CONFIG=:4096:8
    python scripts/probe_generation_repeats.py compare          # first differing step of every row, A against B, C

Options: --arch (a qbench architecture, default llama3_1_8b_instruct), --layers (keep the first N; default all),
--batch 32, --prompt 200:1600 (lengths drawn in this range), --new-tokens 128. A trained model instead:
--pretrained DIR (a saved model folder with its tokenizer, e.g. the fp32 folder qbench converts SmolLM2's GGUF
into under $QBENCH_CACHE/models/gguf-*), and --text FILE (a .jsonl of GSM8K records or plain text) for prompts cut
from real text: random token ids are no text a trained model has seen. PYTHONPATH must hold the repo;
`python scripts/gpu_run.py generation-repeats` runs all four.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["run", "compare"])
    p.add_argument("tag", nargs="?", default="A")
    p.add_argument("--arch", default="llama3_1_8b_instruct")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", default="200:1600")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--out", default=os.environ.get("OUT", "probe_out"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--pretrained", default=None, help="a saved model folder (trained weights) instead of --arch")
    p.add_argument("--text", default=None, help="prompts cut from this file (.jsonl: question + answer fields)")
    return p.parse_args()


def _model(a: argparse.Namespace):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qbench.load import models

    if a.pretrained:
        model = AutoModelForCausalLM.from_pretrained(a.pretrained, dtype=torch.bfloat16).to(a.device)
    else:
        spec = models.architecture_config(a.arch)
        if a.layers:
            spec["num_hidden_layers"] = a.layers
        cfg = AutoConfig.for_model(**spec)
        torch.manual_seed(0)
        with torch.device(a.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    # the same weights in every process, or the comparison means nothing
    with torch.no_grad():
        checksum = sum(float(p.double().abs().sum()) for p in model.parameters())
    return model, checksum


def _text_ids(a: argparse.Namespace) -> torch.Tensor:
    """The --text file's tokens (the --pretrained folder's tokenizer), GSM8K records as question then answer."""
    from transformers import AutoTokenizer

    raw = Path(a.text).read_text()
    if a.text.endswith(".jsonl"):
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        raw = "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in records)
    return torch.tensor(AutoTokenizer.from_pretrained(a.pretrained)(raw)["input_ids"])


def _prompts(a: argparse.Namespace, vocab: int):
    lo, hi = (int(x) for x in a.prompt.split(":"))
    g = torch.Generator().manual_seed(1)
    lengths = sorted(torch.randint(lo, hi + 1, (a.batch,), generator=g).tolist(), reverse=True)
    text = _text_ids(a) if a.text else None
    if text is not None and len(text) < lengths[0]:
        raise SystemExit(f"--text {a.text}: {len(text)} tokens, fewer than the longest prompt ({lengths[0]})")
    width = lengths[0]
    ids = torch.zeros(a.batch, width, dtype=torch.long)
    mask = torch.zeros(a.batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):  # left padding, as lm-eval's HFLM pads for generation
        if text is None:
            ids[row, width - n:] = torch.randint(1000, vocab - 1000, (n,), generator=g)
        else:  # a slice of real text from a random offset
            start = int(torch.randint(0, len(text) - n + 1, (1,), generator=g))
            ids[row, width - n:] = text[start:start + n]
        mask[row, width - n:] = 1
    return ids.to(a.device), mask.to(a.device), lengths


def _bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """bf16's gap between neighbours at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def run(a: argparse.Namespace) -> None:
    if a.text and not a.pretrained:
        raise SystemExit("--text needs --pretrained (its tokenizer)")
    if a.deterministic:
        # read when cuBLAS makes its handle, at the first matmul: here is early enough
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    model, checksum = _model(a)
    ids, mask, lengths = _prompts(a, model.config.vocab_size)
    print(f"[{a.tag}] model made in {time.perf_counter() - t0:.1f} s, weight checksum {checksum:.6f}; "
          f"batch {a.batch}, prompts {lengths[-1]}-{lengths[0]} tokens, {a.new_tokens} new", flush=True)
    outs = []
    ties = None
    for r in range(a.repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            g = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, pad_token_id=0, return_dict_in_generate=True,
                               output_logits=r == 0)
        torch.cuda.synchronize() if a.device == "cuda" else None
        outs.append(g.sequences[:, ids.shape[1]:].cpu())
        if r == 0:
            logits = torch.stack(g.logits, 1).float()  # [batch, steps, vocab], the raw logits
            top2 = logits.topk(2, dim=-1).values
            gap = top2[..., 0] - top2[..., 1]
            spacing = _bf16_spacing(top2[..., 0])
            ties = {"steps": int(gap.numel()), "gap_median": float(gap.median()),
                    "top1_median": float(top2[..., 0].median()),
                    "share_gap_below_bf16_spacing": float((gap < spacing).float().mean()),
                    "share_gap_zero": float((gap == 0).float().mean()),
                    "rows_with_a_tie": int((gap < spacing).any(dim=1).sum())}
            del logits
        print(f"[{a.tag}] repeat {r}: {time.perf_counter() - t:.1f} s", flush=True)
    rows = [int((outs[0] != o).any(dim=1).sum()) for o in outs[1:]]
    same = [n == 0 for n in rows]
    print(f"[{a.tag}] in-process repeats equal to the first: {same} (rows that differ: {rows})", flush=True)
    print(f"[{a.tag}] top-2 logit gaps: {json.dumps(ties)}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": outs[0], "checksum": checksum, "deterministic": a.deterministic, "ties": ties,
                "in_process_equal": same, "lengths": lengths}, out / f"tokens_{a.tag}.pt")


def _first_difference(x: torch.Tensor, y: torch.Tensor) -> list:
    diff = x != y
    return [int(row.nonzero()[0]) if row.any() else None for row in diff]


def compare(a: argparse.Namespace) -> None:
    runs = {p.stem[len("tokens_"):]: torch.load(p) for p in sorted(Path(a.out).glob("tokens_*.pt"))}
    base_tag, base = next(iter(runs.items()))
    for tag, r in runs.items():
        if tag == base_tag:
            continue
        if r["checksum"] != base["checksum"]:
            print(f"{tag}: other weights than {base_tag} (checksum {r['checksum']} vs {base['checksum']})")
            continue
        first = _first_difference(base["tokens"], r["tokens"])
        differ = [f for f in first if f is not None]
        print(f"{base_tag} vs {tag} (deterministic {r['deterministic']}): {len(differ)} of {len(first)} rows "
              f"differ; first differing step per differing row: {differ}")


def main() -> None:
    a = _args()
    run(a) if a.mode == "run" else compare(a)


if __name__ == "__main__":
    main()
