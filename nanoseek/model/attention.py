"""Attention: grouped-query attention (MHA, MQA, GQA) and DeepSeek's Multi-head Latent Attention."""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.cache import KVCache, LatentCache, SlotLayout
from nanoseek.model.layers import RMSNorm, RotaryEmbedding, softmax_scale


def allowed_keys(q_len: int, k_len: int, start_pos: int, key_mask: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, T, S]: query t (at position start_pos+t) may see key s."""
    q_pos = torch.arange(start_pos, start_pos + q_len, device=device)
    allowed = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]  # causal
    if key_mask is not None:  # [B, S], True/1 = a real token
        allowed = allowed & key_mask[:, None, None, :k_len].bool()
    return allowed


# Longest sequence for which CPU training attends in fp32 when activations are bf16/fp16: PyTorch's CPU
# flash-attention backward in reduced precision is slow at short sequences, where the casts to fp32 cost less
# than they save (bench/bench_cpu_kernels.py; bench/RESULTS.md, "CPU kernel choices").
CPU_FP32_ATTENTION_MAX_LEN = 256


def attends_in_fp32_on_cpu(x: torch.Tensor, seq_len: int) -> bool:
    """Whether attention over `x` (a query, bf16/fp16 or under CPU autocast) is better done in fp32."""
    reduced = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    return x.device.type == "cpu" and x.requires_grad and reduced and seq_len <= CPU_FP32_ATTENTION_MAX_LEN


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start_pos: int = 0,
           key_mask: torch.Tensor | None = None, eager: bool = False) -> torch.Tensor:
    """Causal attention. q: [B, H, T, Dqk], k: [B, H, S, Dqk], v: [B, H, S, Dv] -> [B, H, T, Dv]."""
    q_len, k_len = q.shape[2], k.shape[2]
    if attends_in_fp32_on_cpu(q, q_len):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back to bf16
            out = attend(q.float(), k.float(), v.float(), scale, start_pos, key_mask, eager)
        return out.to(q.dtype)
    if key_mask is None and start_pos == 0 and q_len == k_len and not eager:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return attend_masked(q, k, v, scale, allowed_keys(q_len, k_len, start_pos, key_mask, q.device), eager)


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor | None,
                  eager: bool) -> torch.Tensor:
    """Attention under a boolean mask broadcasting to [B, H, T, S] (None: all keys visible); `eager` computes the
    softmax explicitly in fp32, for inspection. Rows with every key masked (left padding) are zeros, never NaN."""
    has_key = None
    if allowed is not None:
        has_key = allowed.any(-1, keepdim=True)  # [B|1, 1, T, 1]
        allowed = allowed | ~has_key  # keep softmax defined; those rows are zeroed below
    if eager:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out if has_key is None else out * has_key.to(out.dtype)


class _Attention(nn.Module):
    """What both kinds share: the eager switch, the per-head max-logit record, the attention itself, dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.eager, self.track_max_logit = False, False
        self.register_buffer("max_logit", torch.zeros(cfg.n_heads), persistent=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, key_mask: torch.Tensor | None,
                dtype: torch.dtype, layout: SlotLayout | None) -> torch.Tensor:
        """q [B, H, T, Dqk], k/v [B, Hkv, S, D] -> wo(heads cast to `dtype`) [B, T, dim]. A static cache's `layout`:
        all its slots under its mask [B, 1, T, S]."""
        bsz, heads, seq_len, head_dim = q.shape
        repeat = heads // k.shape[1]
        if layout is not None and seq_len == 1 and not self.eager:
            # The `repeat` query heads of a group become rows against their shared key head: no cache copy per head.
            out = F.scaled_dot_product_attention(q.reshape(bsz, k.shape[1], repeat, head_dim), k, v,
                                                 attn_mask=layout.mask, scale=self.scale)  # [B, Hkv, repeat, Dv]
            return self.wo(out.reshape(bsz, heads, 1, -1).to(dtype).transpose(1, 2).flatten(2))
        if repeat > 1:  # query head h reads kv head h // repeat, as transformers' repeat_kv
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if layout is not None:
            out = attend_masked(q, k, v, self.scale, layout.mask, self.eager).to(dtype)
        else:
            if self.track_max_logit:
                with torch.no_grad():  # each head's largest causal logit over the batch: [H] fp32
                    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
                    allowed = allowed_keys(q.shape[2], k.shape[2], start_pos, key_mask, q.device)
                    self.max_logit.copy_(scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3)))
            out = attend(q, k, v, self.scale, start_pos, key_mask, self.eager).to(dtype)
            out = F.dropout(out, self.dropout) if self.dropout and self.training else out
        return self.wo(out.transpose(1, 2).flatten(2))


class GQAttention(_Attention):
    """Grouped-query attention (Ainslie et al. 2023): n_heads queries share n_kv_heads keys/values (n_heads:
    MHA, 1: MQA). Optional QK-norm (Dehghani et al. 2023) normalises each head's query and key before RoPE."""

    FUSIBLE = (("wqkv", ("wq", "wk", "wv")),)  # stacked into one linear for generation (model/packed.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.n_kv_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wqkv: nn.Module | None = None  # [wq; wk; wv] in one layer, set by fuse_linears for decoding
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg)
        self.scale = softmax_scale(cfg, cfg.head_dim)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device,
                  layout: SlotLayout | None = None) -> KVCache:
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, dtype, device, layout)

    def forward(self, x: torch.Tensor, start_pos: int = 0, key_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        if self.wqkv is not None:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))  # [B, T, H(kv), D]
        act_dtype = q.dtype
        if attends_in_fp32_on_cpu(q, x.shape[1]):  # before RoPE, which computes in fp32 anyway: no round trip
            q, k, v = q.float(), k.float(), v.float()
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        layout = getattr(cache, "layout", None)  # a static cache's per-row positions and mask
        rope_pos = start_pos if layout is None else layout.positions
        q, k = self.rotary(q, rope_pos), self.rotary(k, rope_pos)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H(kv), T, D]
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        return self._attend(q, k, v, start_pos, key_mask, act_dtype, layout)


class MLAttention(_Attention):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, section 2.1).

    Keys and values come from a shared low-rank latent c_kv (kv_lora_rank), normalised, then up-projected per
    head; positions enter through a decoupled rope key of qk_rope_head_dim shared by all heads. The query may be
    low-rank too (q_lora_rank > 0). Only c_kv and the rope key are cached. Head dims need not be powers of two."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        if self.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, self.n_heads * self.qk_head_dim, bias=False)
        # rows: [c_kv (kv_lora_rank) ; k_rope (qk_rope_head_dim)]
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps) if cfg.kv_latent_norm else nn.Identity()
        if not cfg.kv_latent_norm:  # the latent's typical RMS: the constant weight an export's kv_a_layernorm gets
            self.register_buffer("latent_rms", torch.ones(1))
        # rows grouped per head: [k_nope_h (qk_nope_head_dim) ; v_h (v_head_dim)]
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, cfg.dim, bias=False)
        self.rotary = RotaryEmbedding(self.qk_rope_head_dim, cfg)
        self.scale = softmax_scale(cfg, self.qk_head_dim)
        self.absorb = True  # with a cache, attend from the latent (False: expand K/V per head, for comparison)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device,
                  layout: SlotLayout | None = None) -> LatentCache:
        return LatentCache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype, device, layout)

    def forward(self, x: torch.Tensor, start_pos: int = 0, key_mask: torch.Tensor | None = None,
                cache: LatentCache | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        layout = getattr(cache, "layout", None)  # a static cache's per-row positions and mask
        rope_pos = start_pos if layout is None else layout.positions
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.view(*x.shape[:2], self.n_heads, self.qk_head_dim)  # [B, T, H, qk_head_dim]
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = self.rotary(q_rope, rope_pos)
        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_latent = self.kv_norm(kv_latent)  # [B, T, R]
        k_rope = self.rotary(k_rope.unsqueeze(2), rope_pos).squeeze(2)  # [B, T, Dr], one head for all
        if cache is not None:
            kv_latent, k_rope = cache.update(start_pos, kv_latent, k_rope)  # [B, S, ...]
            if self.absorb:
                return self._absorbed(q_nope, q_rope, kv_latent, k_rope, start_pos, key_mask, layout)
        kv = self.wkv_b(kv_latent).unflatten(-1, (self.n_heads, -1))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [B, S, H, ...]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, Dqk]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        return self._attend(q, k, v.transpose(1, 2), start_pos, key_mask, q.dtype, layout)  # v: [B, H, S, Dv]

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
                  start_pos: int, key_mask: torch.Tensor | None, layout: SlotLayout | None) -> torch.Tensor:
        """Attention straight from the latent cache, K and V never expanded (DeepSeek-V2 section 2.1.3). With
        W_UK_h, W_UV_h the key/value rows of wkv_b for head h:
          q_h . k_h = (W_UK_h^T q_nope_h) . c_s + q_rope_h . k_rope_s   (W_UK absorbed into the query)
          o_h = W_UV_h (sum_s p_hs c_s)                                  (W_UV applied after mixing)
        so every head attends over the same [c ; k_rope] keys: multi-query attention with key width
        kv_lora_rank + qk_rope_head_dim and value width kv_lora_rank.
        q_nope: [B, T, H, Dn], q_rope: [B, T, H, Dr], kv_latent: [B, S, R], k_rope: [B, S, Dr] -> wo(o) [B, T, dim]."""
        w_kv = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [H, Dn, R], [H, Dv, R]
        bsz, seq_len, heads, _ = q_nope.shape
        q_latent = torch.einsum("bthd,hdr->bhtr", q_nope, w_uk)  # [B, H, T, R]
        # Heads x positions are the rows of one query against a single shared key head: no per-head cache copy.
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1).reshape(bsz, 1, heads * seq_len, -1)
        k = torch.cat([kv_latent, k_rope], dim=-1).unsqueeze(1)  # [B, 1, S, R + Dr]
        v = kv_latent.unsqueeze(1)  # [B, 1, S, R]
        mask = None if layout is None else layout.mask  # a static cache's [B, 1, T, S]
        if layout is None and (seq_len > 1 or key_mask is not None):  # one new token, no padding: sees every key
            mask = allowed_keys(seq_len, k.shape[2], start_pos, key_mask, q.device)  # [B|1, 1, T, S]
        if mask is not None and seq_len > 1:  # one query position's mask broadcasts over the heads' rows
            mask = mask.unsqueeze(2).expand(-1, -1, heads, -1, -1).flatten(2, 3)  # [B|1, 1, H*T, S]
        # The scale stays that of qk_head_dim: these are the same logits, computed in another order.
        out = attend_masked(q, k, v, self.scale, mask, self.eager).view(bsz, heads, seq_len, -1)  # [B, H, T, R]
        return self.wo(torch.einsum("bhtr,hvr->bthv", out, w_uv).flatten(2))  # o: [B, T, H, Dv]

    @torch.no_grad()
    def qk_clip_(self, threshold: float) -> None:
        """QK-clip (Kimi K2, arXiv 2507.20534 section 2.1): scale the query/key weights of each head whose max
        logit passed `threshold` by gamma_h = threshold / max_logit_h, so the logit comes back to it. The head's
        own parts (q_nope rows, k_nope rows of wkv_b) get sqrt(gamma_h) each, its q_rope rows gamma_h; the rope
        key is shared by all heads, so left alone."""
        gamma = (threshold / self.max_logit.clamp(min=threshold)).float()  # [H], <= 1
        if bool((gamma < 1).any()):
            w_q = (self.wq_b if self.q_lora_rank else self.wq).weight.view(self.n_heads, self.qk_head_dim, -1)
            w_q[:, :self.qk_nope_head_dim] *= gamma.sqrt().view(-1, 1, 1).to(w_q.dtype)
            w_q[:, self.qk_nope_head_dim:] *= gamma.view(-1, 1, 1).to(w_q.dtype)
            w_kv = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
            w_kv[:, :self.qk_nope_head_dim] *= gamma.sqrt().view(-1, 1, 1).to(w_kv.dtype)
