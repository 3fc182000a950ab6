"""Sampling: prefill once, then decode one token at a time from the KV cache (the latent cache for MLA).

`stream` yields each new token as soon as it exists; `generate` collects them. Neither reads a value
back to the host per token except where asked to: the end-of-text check runs every `sync_every`
tokens (finished rows are padded with eos meanwhile), so a GPU keeps decoding ahead of Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanoseek.model import Transformer


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 keeps every token)")


GREEDY = Sampling(temperature=0.0)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, vocab] -> next token ids [B, 1]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus sampling (Holtzman et al. 2019): smallest set with mass >= top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator drives the draw on any device, so a seed gives the same text everywhere.
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def check_prompt(model: Transformer, prompt: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """The prompt as the model can take it: [B, T0] with T0 < max_seq_len (room for one new token).

    A longer prompt is an error unless `truncate`, which keeps its last max_seq_len - 1 tokens.
    """
    limit = model.config.max_seq_len - 1
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty; pass at least one token (any text, or a newline)")
    if prompt.shape[1] > limit:
        if not truncate:
            raise ValueError(f"the prompt has {prompt.shape[1]} tokens but the model's context is "
                             f"{model.config.max_seq_len} (max_seq_len); shorten it, or pass --truncate to keep "
                             f"its last {limit} tokens")
        prompt = prompt[:, -limit:]
    return prompt


@torch.no_grad()
def stream(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
           eos_id: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
           truncate: bool = False, sync_every: int = 16) -> Iterator[torch.Tensor]:
    """Yield new tokens [B, 1] one at a time (at most max_new_tokens, never past max_seq_len).

    use_cache False re-runs the whole sequence for every token (the slow reference path).
    Rows that emitted eos_id keep emitting it; the stream ends once every row has (checked every
    `sync_every` tokens, and on every token for a batch of one, which is already synchronous).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    was_training = model.training
    model.eval()
    try:
        prompt = check_prompt(model, prompt, truncate)
        total = min(model.config.max_seq_len, prompt.shape[1] + max_new_tokens)
        caches = model.new_caches(prompt.shape[0], total) if use_cache else None
        seq = prompt
        logits = model(prompt, caches=caches).logits[:, -1]  # prefill: [B, vocab]
        done = torch.zeros(prompt.shape[0], 1, dtype=torch.bool, device=prompt.device)
        for n in range(total - prompt.shape[1]):
            nxt = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)  # [B, 1]
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            yield nxt
            pos = prompt.shape[1] + n  # position of nxt
            if pos + 1 >= total:
                break
            if eos_id is not None and (prompt.shape[0] == 1 or (n + 1) % sync_every == 0) and bool(done.all()):
                break
            if use_cache:
                logits = model(nxt, caches=caches, start_pos=pos).logits[:, -1]
            else:
                seq = torch.cat([seq, nxt], dim=1)
                logits = model(seq).logits[:, -1]
    finally:
        model.train(was_training)


def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             truncate: bool = False) -> torch.Tensor:
    """prompt: [B, T0] -> [B, T0 + n], n <= max_new_tokens (fewer at eos or at max_seq_len).

    With truncate, T0 counts the prompt as the model saw it (its last max_seq_len - 1 tokens).
    """
    prompt = check_prompt(model, prompt, truncate)
    new = list(stream(model, prompt, max_new_tokens, sampling, eos_id, generator, use_cache))
    out = torch.cat([prompt, *new], dim=1)
    if eos_id is not None and new:  # drop trailing all-eos columns the periodic check let through
        finished = (out[:, prompt.shape[1]:] == eos_id).long().cumsum(1) > 0  # [B, n]: at/after each first eos
        all_done = finished.all(0)  # [n], monotone
        if bool(all_done.any()):
            out = out[:, :prompt.shape[1] + int(all_done.int().argmax()) + 1]
    return out
