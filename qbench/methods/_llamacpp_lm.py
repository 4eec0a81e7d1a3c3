"""An lm-eval model over a GGUF model loaded in llama.cpp (qbench/methods/_llamacpp.LlamaCppLM, in its worker process).

lm-eval 0.4.13 has no adapter that fits an offline cell: its ``gguf`` model talks to a running llama.cpp HTTP
server, and HFLM needs a transformers model. This one gives lm-eval the same three calls HFLM answers, on the
llama.cpp model the cell already measured, and mirrors HFLM where the numbers depend on it, so a GGUF cell's
MMLU/GSM8K can be set beside a torch cell's item by item:

- tokens come from the cell's HF tokenizer through lm-eval's own ``TemplateLM`` encoding (trailing spaces of a
  context move to the continuation; whole = context + continuation encoded once, then split), with HFLM's
  ``tok_encode`` defaults. llama.cpp's converter keeps the vocabulary, so the ids mean the same to llama.cpp.
- ``loglikelihood``: the continuation's log-probabilities from llama.cpp's full-vocabulary logits
  (``Llama(logits_all=True)``), log-softmax in float64; ``is_greedy`` when every continuation token is the argmax.
  Left truncation to ``max_length`` as HFLM: the last ``max_length + 1`` tokens, the final one only predicted.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, as HFLM.
- ``generate_until``: greedy (argmax, first maximum wins as in transformers), until a stop string appears in the
  decoded continuation, the EOS token, or ``max_gen_toks`` tokens; the context left-truncated to ``max_length -
  max_gen_toks``; the text cut at the first stop string (lm-eval's ``postprocess_generated_text``).

Speed on a CPU: requests are taken in token order and llama.cpp's KV cache keeps the prefix the next request shares
(MMLU's four choices share their question, and a subject's questions share its five few-shot examples), so only
the new tail of each sequence is computed. Positions already computed keep their logits (``Llama.scores``), which
are exactly those a fresh run gives up to llama.cpp's batch-split rounding (about 1e-6 in a log-probability).

``max_length``: ``eval.max_length_tokens``, else the model's training context as HFLM takes it from the model's
config, but at most the llama.cpp context the model was loaded with (``method.n_ctx_tokens``). When that cap cuts
any request shorter than the torch cells would see, the result's accuracy warnings say how many.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

LOG = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default when a task names none (tokens)


class LlamaCppLMEval(TemplateLM):
    """lm-eval's ``LM`` over a loaded ``LlamaCppLM`` and the cell's HF tokenizer (module docstring)."""

    backend = "causal"

    def __init__(self, model: Any, tokenizer: Any, max_length_tokens: Optional[int] = None):
        super().__init__()
        self.model, self.llm, self.tokenizer = model, model.llm, tokenizer
        self.n_ctx = int(model.n_ctx)
        self.n_ctx_train = int(model.n_ctx_train)
        self.max_length_requested = int(max_length_tokens) if max_length_tokens else self.n_ctx_train
        self._max_length = min(self.max_length_requested, self.n_ctx)
        self.truncated = {"loglikelihood": 0, "generate_until": 0}  # requests cut by the llama.cpp context (count)
        self.requests = {"loglikelihood": 0, "generate_until": 0, "loglikelihood_rolling": 0}
        self.tokens_computed = 0  # positions llama.cpp evaluated (tokens); the rest came from the kept prefix
        self.tokens_requested = 0

    # ------------------------------------------------------------------------------------------ lm-eval's API
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def device(self) -> str:
        return "cpu"  # where the logits land; llama.cpp itself may have offloaded layers (method_info says)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        """HFLM's encoding: the tokenizer's own special-token default, none added to a string already led by BOS."""
        special: Dict[str, bool] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests: List[Tuple[Any, List[int], List[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> List[Tuple[float, bool]]:
        """(sum of the continuation's log-probs, all greedy) per (key, context ids, continuation ids)."""
        seqs = []
        for _, context, continuation in requests:
            whole = context + continuation
            if len(whole) > self.max_length + 1:
                self.truncated["loglikelihood"] += 1
            seqs.append((whole[-(self.max_length + 1):][:-1], continuation))
        self.requests["loglikelihood"] += len(requests)
        out: List[Tuple[float, bool]] = [(0.0, False)] * len(seqs)
        self.llm.reset()  # the latency loop left tokens whose logits were not kept
        for i in sorted(range(len(seqs)), key=lambda i: seqs[i][0]):  # neighbours share the longest prefixes
            inp, continuation = seqs[i]
            scores = torch.from_numpy(self._scores(inp)[len(inp) - len(continuation):].astype(np.float64))
            target = torch.tensor(continuation)
            logprobs = torch.log_softmax(scores, dim=-1).gather(1, target[:, None])
            out[i] = (float(logprobs.sum()), bool((scores.argmax(dim=-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole texts over disjoint windows of ``max_length`` tokens (HFLM's windows)."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
        self.requests["loglikelihood_rolling"] += len(requests)
        return out

    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        """Greedy continuations, cut at the first stop string (HFLM's rules; module docstring)."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        self.llm.reset()
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ValueError(f"lm-eval adapter for llama.cpp: greedy decoding only, the task asks {gen_kwargs}")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"eval.max_gen_toks: {max_gen} tokens leave no room for a context in the "
                                 f"{self.max_length}-token lm-eval context (method.n_ctx_tokens)")
            ids = self.tok_encode(context)
            if len(ids) > self.max_length - max_gen:
                self.truncated["generate_until"] += 1
                ids = ids[-(self.max_length - max_gen):]
            text = self.tok_decode(self._greedy(ids, max_gen, until))
            out.append(postprocess_generated_text(text, until, None))
        self.requests["generate_until"] += len(requests)
        return out

    # ------------------------------------------------------------------------------------------ llama.cpp
    def _scores(self, ids: List[int]) -> np.ndarray:
        """llama.cpp's logits for every position of ``ids`` ([tokens, vocab] float32, a view): the prefix the KV
        cache already holds is kept (its logits are still in ``Llama.scores``), only the rest is computed."""
        llm = self.llm
        held = llm.input_ids[: llm.n_tokens]
        n = min(len(held), len(ids))
        diff = np.flatnonzero(held[:n] != np.asarray(ids[:n], dtype=held.dtype))
        common = int(diff[0]) if len(diff) else n
        llm.n_tokens = common  # eval() drops the KV cache from here on
        if common < len(ids):
            llm.eval(ids[common:])
        self.tokens_computed += len(ids) - common
        self.tokens_requested += len(ids)
        return llm.scores[: len(ids)]

    def _greedy(self, ids: List[int], max_gen: int, until: List[str]) -> List[int]:
        """Greedy token ids after ``ids``: stops at EOS, at a stop string in the decoded text, or after max_gen."""
        gen: List[int] = []
        seq = list(ids)
        while len(gen) < max_gen and len(seq) < self.n_ctx:
            tok = int(self._scores(seq)[-1].argmax())
            if tok == self.eot_token_id:
                break
            gen.append(tok)
            seq.append(tok)
            text = self.tok_decode(gen)
            if any(stop and stop in text for stop in until):
                break
        return gen

    # ------------------------------------------------------------------------------------------ qbench's record
    @property
    def qbench_warnings(self) -> List[str]:
        """Requests the llama.cpp context cut shorter than lm-eval would have cut them for a torch cell."""
        cut = {k: v for k, v in self.truncated.items() if v}
        if not cut or self.max_length >= self.max_length_requested:
            return []
        return [f"gguf lm-eval: {', '.join(f'{v} {k} requests' for k, v in cut.items())} left-truncated to the "
                f"{self.max_length}-token llama.cpp context (method.n_ctx_tokens) where a torch cell would keep "
                f"{self.max_length_requested} tokens; raise method.n_ctx_tokens to compare them item by item"]

    def qbench_settings(self) -> Dict[str, Any]:
        return {"model": "llama.cpp in its worker process (qbench/methods/_llamacpp_lm.py)", "decoding": "greedy",
                "max_length_tokens_requested": self.max_length_requested, "n_ctx_tokens": self.n_ctx,
                "n_ctx_train_tokens": self.n_ctx_train, "requests": dict(self.requests),
                "requests_truncated": dict(self.truncated), "tokens_requested": self.tokens_requested,
                "tokens_computed": self.tokens_computed}
