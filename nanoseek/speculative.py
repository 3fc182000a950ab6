"""Self-speculative greedy decoding: the MTP modules draft, the main model verifies.

A model trained with DeepSeek-V3's multi-token prediction (arXiv 2412.19437, section 2.2) already holds D
small "what comes after the next token" predictors; the paper notes they can drive speculative decoding
(Leviathan et al. 2023, arXiv 2211.17192). One round:
  1. The main model has processed positions 0..n-1 and chosen t_n (greedy).
  2. Module k, at position n-1, reads h^{k-1}_{n-1} and the embedding of t_{n+k-1} (t_n, then its own
     drafts) and drafts t_{n+k}: D draft tokens for the cost of D single blocks.
  3. The main model runs once over [t_n, d_1 .. d_D] from its cache and keeps the longest prefix of
     drafts that equals its own greedy choice, plus its own next token: 1 to D + 1 tokens per pass.

Verification keeps exactly the tokens plain greedy decoding would produce; only the number of main model
passes changes. Greedy and batch 1 only (rows would accept different lengths)."""

from dataclasses import dataclass

import torch

from nanoseek.generate import check_prompt
from nanoseek.model import Transformer, eval_mode


@dataclass
class SpeculativeStats:
    rounds: int = 0  # main-model verification passes after the prefill
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per main-model pass (1.0 for plain decoding)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                         truncate: bool = False) -> tuple[torch.Tensor, SpeculativeStats]:
    """prompt [1, T0] -> ([1, T0 + n] tokens equal to greedy decoding, stats)."""
    if model.config.mtp_depth == 0 or len(model.mtp) == 0:
        raise ValueError("speculative decoding drafts with the MTP modules; this model has none "
                         "(model.mtp_depth=0 or mtp_kind='shared'); decode without --speculative")
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time, got a batch of {prompt.shape[0]}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    with eval_mode(model):
        prompt = check_prompt(model, prompt, truncate)
        depth, limit = len(model.mtp), model.config.max_seq_len
        total = min(limit, prompt.shape[1] + max_new_tokens)
        if total == prompt.shape[1]:  # nothing to generate: greedy decoding returns the prompt as it is
            return prompt, SpeculativeStats()
        dtype, device = model.embed.weight.dtype, model.embed.weight.device
        caches = model.new_caches(1, limit)
        mtp_caches = [m.block.attn.new_cache(1, limit, dtype, device) for m in model.mtp]
        out = model(prompt, caches=caches)
        hidden = [out.hidden] + [prompt.new_zeros(1, 0, model.config.dim, dtype=dtype) for _ in range(depth)]
        filled = [0] * depth  # positions of module k's cache that no longer depend on a draft
        tokens = prompt[0].tolist()
        nxt = int(out.logits[0, -1].argmax())
        stats = SpeculativeStats()
        while True:
            n = len(tokens)  # positions 0..n-1 are processed by the main model; nxt is t_n
            tokens.append(nxt)
            if len(tokens) >= total or nxt == eos_id:
                break
            n_drafts = min(depth, total - len(tokens), limit - 1 - n)
            drafts = _draft(model, hidden, filled, mtp_caches, tokens, n, n_drafts, device)
            candidates = torch.tensor([[nxt, *drafts]], device=device)  # positions n .. n + len(drafts)
            out = model(candidates, caches=caches, start_pos=n)
            choice = out.logits[0].argmax(-1).tolist()  # choice[j]: the main model's token after candidate j
            accepted = next((j for j, draft in enumerate(drafts) if draft != choice[j]), len(drafts))
            stats.rounds += 1
            stats.drafted += len(drafts)
            stats.accepted += accepted
            hidden[0] = torch.cat([hidden[0][:, :n], out.hidden[:, :accepted + 1]], dim=1)
            kept = drafts[:accepted]
            if eos_id in kept:
                kept = kept[:kept.index(eos_id) + 1]
            tokens.extend(kept[:total - len(tokens)])
            if len(tokens) >= total or (kept and kept[-1] == eos_id):
                break
            nxt = choice[accepted]
        return torch.tensor([tokens], device=device), stats


def _draft(model: Transformer, hidden: list[torch.Tensor], filled: list[int], mtp_caches: list, tokens: list[int],
           n: int, n_drafts: int, device: torch.device) -> list[int]:
    """Run module k over the positions whose inputs changed since last round (filled[k]..n-1); the
    output at n-1 drafts t_{n+k}. `tokens` holds t_0..t_n; drafts extend a copy as they are made."""
    ext = list(tokens)
    for k, module in enumerate(model.mtp[:n_drafts], start=1):
        start = filled[k - 1]
        prev = hidden[k - 1][:, start:n]  # h^{k-1} at positions start..n-1: [1, L, dim]
        nxt_ids = torch.tensor([ext[start + k:n + k]], device=device)  # t_{i+k} for each position i
        h, normed = module(prev, model.embed(nxt_ids), start_pos=start, cache=mtp_caches[k - 1])
        hidden[k] = torch.cat([hidden[k][:, :start], h], dim=1)
        # Position i is final once t_{i+k} is an accepted token (i <= n-k) and h^{k-1}_i was final.
        filled[k - 1] = max(start, n - k + 1)
        ext.append(int(model.head(normed[:, -1]).argmax(-1)))
    return ext[len(tokens):]
