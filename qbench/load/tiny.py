"""The demo model: a 2-layer Llama and a byte-level BPE tokenizer, built here, deterministically, offline.

Nothing is downloaded: the tokenizer is trained on the bundled text (qbench/data/tiny_text.txt) and the
weights are random from a fixed seed. Accuracy and speed of this model mean nothing; it exists so that every
stage of the pipeline runs on a laptop in seconds. Hidden size 128 so that GPTQ/AWQ group size 128 divides it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA_DIR = Path(__file__).parents[1] / "data"
TINY_TEXT = DATA_DIR / "tiny_text.txt"
VOCAB_SIZE = 2048

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "initializer_range": 0.02,
}


def build_tokenizer(text_path: Path = TINY_TEXT):
    """Train a byte-level BPE tokenizer on the bundled text (deterministic: same text, same merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train([str(text_path)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def build(out_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Write the tiny model and its tokenizer to ``out_dir`` (a Hugging Face model directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(**TINY_LLAMA)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def rebuild_text(shared_data: Path) -> None:
    """Re-cut qbench/data/tiny_text.txt from the original GSM8K and MMLU files (see data/README.md)."""
    import csv

    parts = []
    with open(shared_data / "gsm8k" / "train.jsonl") as f:
        for i, line in enumerate(f):
            if i >= 300:
                break
            row = json.loads(line)
            parts.append(row["question"] + "\n" + row["answer"])
    for path in sorted((shared_data / "mmlu" / "dev").glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.reader(f):
                choices = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", row[1:5]))
                parts.append(row[0] + "\n" + choices + "\nAnswer: " + row[5])
    TINY_TEXT.write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild-text", metavar="SHARED_DATA", type=Path, help="re-cut tiny_text.txt")
    parser.add_argument("--out", type=Path, help="write the tiny model here")
    args = parser.parse_args()
    if args.rebuild_text:
        rebuild_text(args.rebuild_text)
    if args.out:
        print(build(args.out))
