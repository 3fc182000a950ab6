"""Sampling with a KV cache (the latent cache for MLA)."""

from __future__ import annotations

import torch

from nanoseek.model import Transformer


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
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt: [B, T0] -> [B, T0 + n] (n <= max_new_tokens; stops early when every row hit eos).

    Prefills the cache with the prompt, then decodes one token at a time from the cache.
    """
    was_training = model.training
    model.eval()
    max_len = min(model.config.max_seq_len, prompt.shape[1] + max_new_tokens)
    prompt = prompt[:, -(max_len - 1):] if prompt.shape[1] >= max_len else prompt
    caches = model.new_caches(prompt.shape[0], max_len)
    logits = model(prompt, caches=caches).logits[:, -1]
    tokens, done = [prompt], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    pos = prompt.shape[1]
    while pos < max_len:
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        tokens.append(nxt)
        if eos_id is not None:
            done |= nxt.squeeze(1) == eos_id
            if bool(done.all()):
                break
        if pos + 1 >= max_len:
            break
        logits = model(nxt, caches=caches, start_pos=pos).logits[:, -1]
        pos += 1
    model.train(was_training)
    return torch.cat(tokens, dim=1)
