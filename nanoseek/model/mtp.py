"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437, section 2.2).

Targets follow the loader's layout: `targets[:, j]` is the token after position j, so `targets[:, k:k+T]` are
the tokens k+1 ahead of each input position. A [B, T + depth] target tensor gives every depth all T positions;
a plain [B, T] one loses the last k positions at depth k."""

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import RMSNorm


class MTPModule(nn.Module):
    """Depth-k module: eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)]) -> one Block -> norm.

    The embedding comes first, as in DeepSeek-V3's released checkpoint and transformers' MtpLayer (the paper's
    equation 21 lists h first; the weights are what count). Embedding and output head are the main model's."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, hidden: torch.Tensor, next_embed: torch.Tensor, start_pos: int = 0,
                cache=None, router_losses: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, next_embed: [B, L, dim] -> (h^k [B, L, dim] for the next depth, normed output for the head).
        start_pos/cache let speculative decoding run the module incrementally (its block's own KV cache)."""
        h = self.eh_proj(torch.cat([self.enorm(next_embed), self.hnorm(hidden)], dim=-1))
        h = self.block(h, start_pos, None, cache, router_losses)
        return h, self.norm(h)
