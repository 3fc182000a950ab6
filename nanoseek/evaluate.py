"""Held-out evaluation of a trained model: loss, perplexity and bits per byte.

Perplexity = exp(loss) depends on the tokenizer; bits per byte does not, so it compares models with
different tokenizers: the summed next-token loss (nats) over a text / ln 2 / the UTF-8 bytes it spells."""

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.data import Tokenizer, is_prepared_dir, iter_documents, load_prepared, read_tokens, token_windows
from nanoseek.model import Transformer, eval_mode


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes those tokens decode to

    def line(self) -> str:
        return (f"loss {self.loss:.4f} | perplexity {self.perplexity:.3f} | bits/byte {self.bits_per_byte:.4f} | "
                f"{self.tokens:,} tokens, {self.bytes:,} bytes")


def token_stream(source: str | None, tokenizer: Tokenizer, run_data: Path | None = None,
                 max_tokens: int | None = None) -> np.ndarray:
    """The ids to score, 1-D: for source None the validation split of the run's own prepared data
    (`run_data`); for a prepared directory its validation split; for anything `nanoseek train --data`
    accepts its documents, encoded with the model's tokenizer and joined by eos (as training saw them)."""
    if max_tokens is not None and max_tokens < 2:  # 0 means 0 tokens, which cannot be scored; not "all"
        raise ValueError(f"--max-tokens {max_tokens}: must be >= 2 (a score needs a token and the next one); omit "
                         "it to score everything")
    if source is None or is_prepared_dir(source):
        prepared = load_prepared(run_data if source is None else source)
        if prepared.vocab_size > tokenizer.vocab_size:
            raise ValueError(f"{prepared.out_dir} was tokenised with {prepared.vocab_size} ids but the model's "
                             f"tokenizer has {tokenizer.vocab_size}; evaluate on text instead (--data FILE)")
        return read_tokens(prepared.val_shards, max_tokens)
    chunks, total = [], 0
    for doc in iter_documents(source):
        chunks.append(np.asarray(tokenizer.encode(doc) + [tokenizer.eos_id], dtype=np.int64))
        total += len(chunks[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(chunks)[:max_tokens]


@torch.no_grad()
def evaluate_ids(model: Transformer, tokenizer: Tokenizer, ids: np.ndarray, seq_len: int | None = None,
                 batch_size: int = 8, autocast_dtype: torch.dtype | None = None, progress: bool = False) -> EvalResult:
    """Score every token of `ids` after the first, in windows of seq_len (default: the model's context)."""
    if len(ids) < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens; pass a longer text")
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: both must be >= 1 (seq_len None: the "
                         "model's max_seq_len)")
    if int(ids.max()) >= model.config.vocab_size:
        raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary ({model.config.vocab_size}); "
                         "the data was tokenised with another tokenizer")
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    device = model.embed.weight.device
    nats, tokens, n_bytes = 0.0, 0, 0
    n_full, tail = divmod(len(ids) - 1, seq_len)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    windows = tqdm(token_windows([ids], seq_len, batch_size, tail=True), desc="eval", unit="batch",
                   total=math.ceil(n_full / batch_size) + (1 if tail else 0), disable=not progress)
    with eval_mode(model):
        for x, y in windows:
            with autocast:
                out = model(x.to(device), y.to(device))
            nats += float(out.losses["ce"]) * y.numel()
            tokens += y.numel()
            # eos ends a document but spells no text: it is scored, its bytes are not counted
            n_bytes += sum(len(tokenizer.decode([t for t in row.tolist() if t != tokenizer.eos_id]).encode("utf-8"))
                           for row in y)
    loss = nats / tokens
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                      bits_per_byte=nats / (math.log(2) * max(n_bytes, 1)), tokens=tokens, bytes=n_bytes)
