"""The Transformer: embeddings -> Blocks -> norm -> head, plus MTP modules."""

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention import GQAttention, MLAttention
from nanoseek.model.cache import SlotLayout
from nanoseek.model.layers import MLP, RMSNorm, at_least_fp32
from nanoseek.model.moe import Experts, MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.npt import NPTBlock

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab]; None when the loss was computed in chunks (loss_chunk > 0)
    loss: torch.Tensor | None = None  # total, what backward() is called on
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # ce, mtp_1.., aux, z, logit_z
    hidden: torch.Tensor | None = None  # [B, T, dim] last layer's output before the final norm (no targets)
    logit_max: torch.Tensor | None = None  # max |logit| (scalar), chunked loss with stat tracking on only


class Block(nn.Module):
    """Pre-norm residual block: x + attn(attn_norm(x)), then + ffn(ffn_norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.attention == "mla" else GQAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim, cfg.swiglu_clamp)

    def forward(self, x: torch.Tensor, start_pos: int = 0, key_mask: torch.Tensor | None = None,
                cache=None, router_losses: list | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]; an MoE appends its router losses to `router_losses`."""
        x = x + self.attn(self.attn_norm(x), start_pos, key_mask, cache)
        if isinstance(self.ffn, MoE):
            return x + self.ffn(self.ffn_norm(x), router_losses)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """A DeepSeek-style decoder: `model(idx, targets)` returns a ModelOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        n_modules = cfg.mtp_depth if cfg.mtp_kind == "modules" else 0
        # MTP blocks reuse the last layer's kind (MoE or dense), as DeepSeek-V3 does.
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.n_layers - 1)) for _ in range(n_modules))
        # A buffer, not a Python float: ramped every step (before_step) without triggering a recompile.
        self.register_buffer("mtp_weight", torch.tensor(float(cfg.mtp_weight)), persistent=False)
        self.set_training_options()
        self.reset_parameters()
        for i in cfg.npt_layers:  # an `nanoseek npt` student's converted blocks (model/npt.py)
            self.layers[i] = NPTBlock(self.layers[i], cfg.npt_rank, cfg.npt_safe_mode)
        self.set_stat_tracking(False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal (init_std, cut at 3 std); residual output projections scaled by 1/sqrt(2 * n_layers)
        (GPT-2, Radford et al. 2019) so the stream's variance does not grow with depth; norms 1."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)  # RMSNorm weights are the only 1-D parameters
                continue
            s = residual_std if name.endswith(("attn.wo.weight", ".w2.weight", "experts.w2")) else std
            nn.init.trunc_normal_(param, mean=0.0, std=s, a=-3 * s, b=3 * s)

    def _run_block(self, block: Block, x: torch.Tensor, start_pos: int, key_mask, cache,
                   router_losses: list) -> torch.Tensor:
        if self.activation_checkpointing and self.training and cache is None:
            # Non-reentrant checkpointing; the recompute must not count the block's MoE loads a second time
            # (the router losses it appends again come after the forward summed them: unread).
            return checkpoint(block, x, start_pos, key_mask, None, router_losses, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _loads_not_counted(block)))
        return block(x, start_pos, key_mask, cache, router_losses)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, caches: list | None = None,
                start_pos: int = 0) -> ModelOutput:
        """idx: [B, T] token ids; targets: [B, T] or [B, T + mtp_depth] (targets[:, j] follows position j;
        IGNORE_INDEX positions are not scored); attention_mask: [B, start_pos + T], 1 for real tokens and 0 for
        padding; caches: one per layer from `new_caches`. Returns logits [B, T, vocab] and, with targets, the
        loss and its named parts; with targets and loss_chunk > 0 the logits are never formed (logits is None)."""
        if caches is not None and self.training and self.activation_checkpointing:
            raise ValueError("KV caches cannot be used while training with activation checkpointing; call model.eval()")
        x = self.embed(idx)  # [B, T, dim]
        router: list[dict[str, torch.Tensor]] = []  # each MoE layer's router losses, in call order
        for i, block in enumerate(self.layers):
            x = self._run_block(block, x, start_pos, attention_mask, caches[i] if caches else None, router)
        normed = self.norm(x)
        if targets is None:  # no loss; the router losses are still there for an objective of its own
            return ModelOutput(self.head(normed), hidden=x, losses=_sum_router_losses(router))
        z_coef, main_targets = self.config.logit_z_loss_coef, targets[:, :idx.shape[1]]
        if self.loss_chunk > 0:  # no [B, T, vocab] logits: see chunked_cross_entropy
            ce, lse_sq, logit_max = chunked_cross_entropy(self.head, normed, main_targets, self.loss_chunk,
                                                          logsumexp_sq=z_coef > 0, logit_max=self.track_logit_max)
            logits, scored = None, normed
        else:
            logits = self.head(normed)
            ce = _cross_entropy(logits, main_targets)
            lse_sq = at_least_fp32(logits).logsumexp(-1).pow(2).mean() if z_coef > 0 else None
            logit_max, scored = None, logits
        mtp = self._mtp_losses(x, scored, targets, router)
        losses = {"ce": ce, **mtp}
        if z_coef > 0:  # PaLM (arXiv 2204.02311, section 5): keeps log Z near 0
            losses["logit_z"] = z_coef * lse_sq
        losses.update(_sum_router_losses(router))
        # DeepSeek-V3 eq. 25: lambda / D * sum_k L_k
        total = ce + self.mtp_weight * torch.stack(list(mtp.values())).mean() if mtp else ce
        loss = sum((losses[k] for k in ("logit_z", "aux", "z") if k in losses), total)  # added in this order
        return ModelOutput(logits, loss, losses, logit_max=logit_max)

    def _mtp_losses(self, x: torch.Tensor, scored: torch.Tensor, targets: torch.Tensor,
                    router: list) -> dict[str, torch.Tensor]:
        """x: [B, T, dim] the last layer's output; scored: the main logits [B, T, vocab], or with loss_chunk the
        normed hidden [B, T, dim] they come from. MTP blocks append their router losses to `router`."""
        losses, hidden = {}, x
        for k in range(1, self.config.mtp_depth + 1):
            n = min(x.shape[1], targets.shape[1] - k)  # positions that have a target k+1 ahead
            if n <= 0:
                break
            if self.config.mtp_kind == "shared":  # one head: the main logits also scored against tokens k+1 ahead
                losses[f"mtp_{k}"] = self._head_loss(scored[:, :n], targets[:, k:k + n], self.loss_chunk > 0)
            else:  # token t_{i+k} is targets[:, i+k-1]; ignored (padding) ids are embedded as token 0
                next_embed = self.embed(targets[:, k - 1:k - 1 + n].clamp(min=0))
                hidden, normed = self.mtp[k - 1](hidden[:, :n], next_embed, router_losses=router)
                losses[f"mtp_{k}"] = self._head_loss(normed, targets[:, k:k + n], is_hidden=True)
        return losses

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor, is_hidden: bool) -> torch.Tensor:
        """Mean CE of x, logits [B, L, vocab], or of head(x) when x is the normed hidden [B, L, dim] (is_hidden)."""
        if is_hidden and self.loss_chunk > 0:  # shared MTP recomputes the head per depth: a matmul, no full logits
            return chunked_cross_entropy(self.head, x, targets, self.loss_chunk)[0]
        return _cross_entropy(self.head(x) if is_hidden else x, targets)

    def new_caches(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   layout: SlotLayout | None = None) -> list:
        """One KV cache per layer (full K/V for GQA, latent + rope key for MLA), static under a `layout`."""
        weight = self.embed.weight
        return [block.attn.new_cache(batch, max_len or self.config.max_seq_len, dtype or weight.dtype, weight.device,
                                     layout) for block in self.layers]

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes per token over all layers."""
        return self.config.kv_cache_values_per_token() * self.config.n_layers * dtype.itemsize

    def num_params(self, active: bool = False, include_mtp: bool = True, include_embedding: bool = True) -> int:
        """Parameter count (a tied weight once); `active` counts only the n_activated_experts of each MoE layer."""
        total = sum(p.numel() for name, p in self.named_parameters()
                    if (include_mtp or not name.startswith("mtp.")) and (include_embedding or name != "embed.weight"))
        if active:
            cfg = self.config
            n_moe = sum(1 for name, _ in self.moe_layers() if include_mtp or not name.startswith("mtp."))
            total -= n_moe * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 * N_active (no embedding
        lookup) + 6 * n_layers * n_heads * T * (d_qk + d_v) for the attention scores and mixing."""
        cfg = self.config
        seq_len = seq_len or cfg.max_seq_len
        n_active = self.num_params(active=True, include_embedding=False)
        if cfg.tie_embeddings:  # the head matmul still costs 2 * dim * vocab per token
            n_active += cfg.dim * cfg.vocab_size
        d_qk, d_v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.attention == "mla" else (cfg.head_dim, cfg.head_dim)
        return 6.0 * n_active + 6.0 * (cfg.n_layers + len(self.mtp)) * cfg.n_heads * seq_len * (d_qk + d_v)

    # ---- the training interface: what a trainer calls on the model --------------------------------

    def set_training_options(self, loss_chunk: int = 0, activation_checkpointing: bool = False,
                             mtp_rampup_steps: int = 0) -> None:
        """Set once before training. loss_chunk: tokens per chunk of the fused head + cross-entropy when
        targets are given (0: plain, full logits); activation_checkpointing: recompute each block in
        backward; mtp_rampup_steps: optimizer steps over which the MTP weight ramps up to its value."""
        self.loss_chunk, self.activation_checkpointing = loss_chunk, activation_checkpointing
        self.mtp_rampup_steps = mtp_rampup_steps

    def before_step(self, opt_step: int, track_stats: bool) -> None:
        """Before a step's first forward: the MTP weight on its ramp, and whether to record `health_stats`'s stats."""
        self.mtp_weight.fill_(self.config.mtp_weight * min(1.0, (opt_step + 1) / max(self.mtp_rampup_steps, 1)))
        self.set_stat_tracking(track_stats)

    def after_optimizer_step(self, sum_=None, max_=None) -> None:
        """After an applied update: the MoE balance-bias step and QK-clip. `sum_` / `max_`: in-place reductions
        over data-parallel ranks (None in one process), each run once over all layers, so every replica moves alike."""
        self.update_balance_bias(sum_)
        self.apply_qk_clip(max_)

    @torch.no_grad()
    def reset_expert_loads(self) -> None:
        """Forget the loads counted since the last update: a dropped update's must not move the balance bias."""
        for _, moe in self.moe_layers():
            moe.gate.load.zero_()

    after_skipped_step = reset_expert_loads

    @torch.no_grad()
    def health_stats(self) -> dict[str, float]:
        """Statistics of the last forward with stat tracking on, read to the host in one transfer: values
        the opt-in SwiGLU clamp clamped so far (never silent), max attention logit per layer, expert load
        imbalance (max/mean; left out before any token was counted), router max logit and z."""
        stats: dict[str, torch.Tensor] = {}
        if self.config.swiglu_clamp > 0:
            stats["swiglu_clamped"] = sum(m.clamped for m in self.modules() if isinstance(m, (MLP, Experts)))
        stats.update({f"attn_logit_max/{name}": attn.max_logit.max()
                      for name, attn in self.attention_layers() if attn.track_max_logit})
        for name, moe in self.moe_layers():
            load = moe.gate.last_load  # all 0 (so max / mean is NaN) before any token was counted
            stats[f"expert_load_imbalance/{name}"] = load.max() / load.mean()
            stats[f"router_logit_max/{name}"], stats[f"router_z/{name}"] = moe.gate.logit_stats.unbind()
        if not stats:
            return {}
        device = next(iter(stats.values())).device
        values = torch.stack([v.float().to(device) for v in stats.values()]).tolist()
        return {k: v for k, v in zip(stats, values) if not (k.startswith("expert_load_imbalance/") and math.isnan(v))}

    @torch.no_grad()
    def max_attention_logit(self, reduce=None) -> float | None:
        """The largest attention logit of the last forward with stat tracking on, over layers and heads (and
        over data-parallel ranks through `reduce`, an in-place max); None if no layer recorded one."""
        tracked = [attn.max_logit.max() for _, attn in self.attention_layers() if attn.track_max_logit]
        if not tracked:
            return None
        largest = torch.stack(tracked).max().float()
        if reduce is not None:
            reduce(largest)
        return largest.item()

    def moe_layers(self) -> list[tuple[str, MoE]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoE)]

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, (MLAttention, GQAttention))]

    @torch.no_grad()
    def update_balance_bias(self, reduce=None) -> None:
        """The aux-loss-free balancing step of every MoE layer, on the loads summed over ranks by `reduce`."""
        gates = [moe.gate for _, moe in self.moe_layers()]
        _reduce_together([gate.load for gate in gates], reduce)
        for gate in gates:
            gate.update_balance_bias()

    def set_stat_tracking(self, enabled: bool) -> None:
        """Record attention and router logit statistics in the next forwards (MLA always does under QK-clip)."""
        for _, attn in self.attention_layers():
            attn.track_max_logit = enabled or (self.config.qk_clip_threshold > 0 and isinstance(attn, MLAttention))
        for _, moe in self.moe_layers():
            moe.gate.track_stats = enabled
        self.track_logit_max = enabled

    @torch.no_grad()
    def apply_qk_clip(self, reduce=None) -> None:
        """QK-clip every MLA layer whose max logit (maxed over ranks by `reduce`) passed qk_clip_threshold."""
        if self.config.qk_clip_threshold > 0:
            layers = [attn for _, attn in self.attention_layers() if isinstance(attn, MLAttention)]
            _reduce_together([attn.max_logit for attn in layers], reduce)
            for attn in layers:
                attn.qk_clip_(self.config.qk_clip_threshold)


def _sum_router_losses(router: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The MoE router losses of one forward pass, summed over layers: 'aux' and 'z' when on."""
    parts = {name: [layer[name] for layer in router if name in layer] for name in ("aux", "z")}
    return {name: torch.stack(found).sum() for name, found in parts.items() if found}


@contextlib.contextmanager
def _loads_not_counted(block: nn.Module):
    gates = [m.gate for m in block.modules() if isinstance(m, MoE)]
    for gate in gates:
        gate.count_loads = False
    try:
        yield
    finally:
        for gate in gates:
            gate.count_loads = True


def _reduce_together(tensors: list[torch.Tensor], reduce) -> None:
    """Run the in-place collective `reduce` once over all `tensors` (flattened into one), writing back."""
    if reduce is None or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in at least fp32. logits [B, L, V], targets [B, L]."""
    return F.cross_entropy(at_least_fp32(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, logsumexp_sq: bool,
                logit_max: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [C, dim], targets [C] -> (summed CE, summed logsumexp^2 or 0, max |logit| or 0), >= fp32 scalars."""
    logits = at_least_fp32(head(hidden))  # [C, vocab]: the only full-vocabulary tensor, alive for one chunk
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    zero = logits.new_zeros(())
    lse_sq = logits.logsumexp(-1).pow(2).sum() if logsumexp_sq else zero
    peak = logits.detach().abs().amax() if logit_max else zero
    return ce, lse_sq, peak


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
                          logsumexp_sq: bool = False, logit_max: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean token cross-entropy of head(hidden), hidden [B, L, dim] normed, targets [B, L], without the [B*L, vocab]
    logits: each chunk's are reduced to a summed loss, dropped and recomputed in backward (checkpointing), so
    O(chunk x vocab) memory for one more head matmul (Liger Kernel's fused linear cross-entropy, in plain torch).
    Returns (mean CE over scored tokens, mean logsumexp^2 over all positions (the logit z-loss) if
    `logsumexp_sq`, max |logit| if `logit_max`; None where not asked)."""
    fn = functools.partial(_chunk_loss, head, logsumexp_sq=logsumexp_sq, logit_max=logit_max)
    if torch.is_grad_enabled():  # no RNG stash: head + CE draw no random numbers, and the stash costs time per chunk
        fn = functools.partial(checkpoint, fn, use_reentrant=False, preserve_rng_state=False)
    flat_targets = targets.flatten()
    ce, lse_sq, peak = zip(*(fn(*rows) for rows in zip(hidden.flatten(0, 1).split(chunk), flat_targets.split(chunk))))
    n_scored = (flat_targets != IGNORE_INDEX).sum()
    return (sum(ce) / n_scored, sum(lse_sq) / flat_targets.numel() if logsumexp_sq else None,
            functools.reduce(torch.maximum, peak) if logit_max else None)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the body (no dropout), then back in the mode it had, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
