"""DeepSeekMoE: a router with auxiliary-loss-free balancing, stacked routed experts, shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import MLP, swiglu


class Gate(nn.Module):
    """Top-k router (DeepSeek-V3, arXiv 2412.19437, section 2.1.2).

    Scores are sigmoid (V3) or softmax (V2) of fp32 logits. A per-expert `balance_bias` is added
    to the scores for *selection only*; the combine weights are the unbiased scores of the chosen
    experts (normalised to sum 1 for sigmoid), times route_scale. The bias is updated outside
    autograd once per optimizer step: bias += balance_rate * sign(mean_load - load).
    Optional group-limited routing keeps the n_limited_groups best of n_expert_groups groups."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.n_activated_experts
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.n_groups, self.n_limited_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.fp32, self.balance_rate = cfg.router_fp32, cfg.balance_rate
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.router_z_loss_coef
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("balance_bias", torch.zeros(cfg.n_routed_experts))
        # Tokens routed to each expert since the last bias update (over micro-batches), and at that update.
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.count_loads = True  # off while activation checkpointing recomputes the block: count once per step
        self.track_stats = False
        self.register_buffer("logit_stats", torch.zeros(2), persistent=False)  # max |logit|, mean z

    def forward(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x: [N, dim] (N = batch * T) -> weights [N, k], indices [N, k], losses {'aux', 'z'} (scalars)."""
        score_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        if self.fp32:
            # Autocast would cast F.linear back to bf16/fp16 whatever its inputs; switch it off here.
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.to(score_dtype), self.weight.to(score_dtype))
        else:
            logits = F.linear(x, self.weight.to(x.dtype)).to(score_dtype)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(-1)  # [N, E]
        choice = scores.detach() + self.balance_bias
        if self.n_groups > 1:
            choice = self._limit_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices  # [N, k]
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        with torch.no_grad():
            if self.training and self.count_loads:
                self.load += expert_counts(indices.flatten(), self.n_experts).to(self.load.dtype)
            if self.track_stats:
                self.logit_stats.copy_(torch.stack([logits.abs().max(), logits.logsumexp(-1).pow(2).mean()]))
        return weights, indices, self._losses(logits, scores, indices, batch)

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(choice.shape[0], self.n_groups, -1)  # [N, G, E/G]
        # V3 scores a group by its top-2 experts, V2 by its best one.
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if self.score_func == "sigmoid" else grouped.amax(-1)
        keep = group_scores.topk(self.n_limited_groups, dim=-1).indices  # [N, n_limited]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).flatten(1)

    def _losses(self, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor,
                batch: int) -> dict[str, torch.Tensor]:
        losses = {}
        if self.aux_loss_coef > 0:
            # Sequence-wise balance loss, DeepSeek-V3 eqs. 17-20: alpha * sum_i f_i * P_i per sequence.
            seq_len = scores.shape[0] // batch
            probs = (scores / scores.sum(-1, keepdim=True)).view(batch, seq_len, -1)  # [B, T, E]
            hits = F.one_hot(indices, self.n_experts).sum(1).view(batch, seq_len, -1).float()
            frac = hits.mean(1) * self.n_experts / self.top_k  # f_i, [B, E]
            losses["aux"] = self.aux_loss_coef * (frac * probs.mean(1)).sum(-1).mean()
        if self.z_loss_coef > 0:
            # Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): keeps router logits small.
            losses["z"] = self.z_loss_coef * logits.logsumexp(-1).pow(2).mean()
        return losses

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """One aux-loss-free balancing step from the loads counted since the last call (summed over ranks by
        Transformer.update_balance_bias), then reset. No host read of the total: with no tokens counted every
        sign is 0 and last_load keeps its value, so no device sync per MoE layer."""
        total = self.load.sum()
        self.balance_bias += self.balance_rate * torch.sign(self.load.mean() - self.load)
        fraction = self.load / total.clamp(min=1) * self.top_k  # fraction of tokens per expert
        self.last_load.copy_(torch.where(total > 0, fraction, self.last_load))
        self.load.zero_()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: torch._grouped_mm's backward fails on
    zero-stride gradients (e.g. from `.sum().backward()`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def expert_counts(flat_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows routed to each expert: flat_indices [M] (expert ids) -> [n_experts] int64. A scatter-add, not
    torch.bincount, whose data-dependent size reads the maximum back to the host and breaks compiled graphs."""
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm wants 16-byte aligned strides; otherwise we take the batched path."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # float64 (reference checks) takes the batched path
    if x.dtype != torch.bfloat16 and (torch.compiler.is_compiling() or x.is_cuda):
        # Eager CPU accepts fp32/fp16, but the op's compile-time (meta) check and the CUDA kernels demand
        # bf16 (torch.nn.functional.grouped_mm docs: "bfloat16 ... on CUDA devices with SM >= 80").
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    align = 16 // x.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


class Experts(nn.Module):
    """n routed SwiGLU experts stored stacked: w1, w3 [E, inter, dim] and w2 [E, dim, inter].

    Tokens are sorted by expert and multiplied group by group with torch._grouped_mm where its alignment
    rules hold, else with one padded batched matmul; never a loop. An expert with no tokens is fine on both."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, dim, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.n_experts = n
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))  # gate
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))  # down
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))  # up
        self.clamp = cfg.swiglu_clamp
        self.register_buffer("clamped", torch.zeros((), dtype=torch.long), persistent=False)
        self.use_grouped_mm = True

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x: [N, dim], weights/indices: [N, k] -> sum_k weights * expert_k(x): [N, dim]."""
        top_k = indices.shape[1]
        flat = indices.flatten()  # [N*k]
        order = flat.argsort(stable=True)
        token_of = order // top_k  # which token each sorted row belongs to
        counts = expert_counts(flat, self.n_experts)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w1, w2, w3 = (w.to(dtype) for w in (self.w1, self.w2, self.w3))
        rows = x[token_of].to(dtype)  # [N*k, dim], grouped by expert
        if self.use_grouped_mm and _grouped_mm_ok(rows, w1, w2):
            out = self._grouped(rows, counts, w1, w2, w3)
        else:
            out = self._batched(rows, flat[order], counts, w1, w2, w3, top_k)
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))

    def _grouped(self, rows, counts, w1, w2, w3) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        rows = _ContiguousGrad.apply(rows)
        gate = torch._grouped_mm(rows, w1.transpose(-1, -2), offs=offsets)  # [N*k, inter]
        up = torch._grouped_mm(rows, w3.transpose(-1, -2), offs=offsets)
        hidden = _ContiguousGrad.apply(swiglu(gate, up, self.clamp, self.clamped))
        return torch._grouped_mm(hidden, w2.transpose(-1, -2), offs=offsets)  # [N*k, dim]

    def _batched(self, rows, sorted_experts, counts, w1, w2, w3, top_k: int) -> torch.Tensor:
        # Slot of each row inside its expert's group, then one [E, capacity, dim] batched matmul.
        starts = counts.cumsum(0) - counts
        slot = torch.arange(rows.shape[0], device=rows.device) - starts[sorted_experts]
        if torch.compiler.is_compiling():
            # A token's top-k experts are distinct, so no expert gets more than N = rows / k rows: a static
            # capacity keeps the graph whole (reading counts.max() would break it) at the price of padding.
            capacity = rows.shape[0] // top_k
        else:
            capacity = int(counts.max()) if rows.shape[0] else 0  # one host sync (free on CPU)
        padded = rows.new_zeros(self.n_experts, max(capacity, 1), rows.shape[1]).index_put((sorted_experts, slot), rows)
        gate, up = torch.bmm(padded, w1.transpose(1, 2)), torch.bmm(padded, w3.transpose(1, 2))
        hidden = swiglu(gate, up, self.clamp, self.clamped)
        return torch.bmm(hidden, w2.transpose(1, 2))[sorted_experts, slot]  # [N*k, dim]


def per_expert_loop(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`Experts.forward` as a Python loop over experts, a host sync each: the reference for tests and benchmarks."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    out = torch.zeros_like(x)
    for e in range(experts.n_experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        rows = x[token].to(dtype)
        w1, w2, w3 = (w[e].to(dtype) for w in (experts.w1, experts.w2, experts.w3))
        hidden = swiglu(rows @ w1.T, rows @ w3.T, experts.clamp, experts.clamped)
        y = (hidden @ w2.T) * weights[token, slot, None].to(dtype)
        out = out.index_add(0, token, y.to(x.dtype))
    return out


class MoE(nn.Module):
    """Routed experts plus always-on shared experts (DeepSeekMoE, arXiv 2401.06066)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        # n shared experts of width moe_inter_dim are exactly one SwiGLU of width n * moe_inter_dim.
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg.swiglu_clamp)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, router_losses: list | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]; appends the router losses ({'aux', 'z'} when on) to `router_losses`."""
        flat = x.flatten(0, 1)  # [B*T, dim]
        weights, indices, losses = self.gate(flat, x.shape[0])
        if router_losses is not None:
            router_losses.append(losses)
        out = self.experts(flat, weights, indices).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
