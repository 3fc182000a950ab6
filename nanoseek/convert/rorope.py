"""GQA -> MLA for one attention layer, keeping every RoPE frequency that fits (the default `--method rorope`).

Notation as in convert_mla.py: H query heads of head_dim D in G key/value groups, pair p = dims (2p, 2p+1),
z_g,p = k_g,2p + i k_g,2p+1 the complex key of group g at pair p; u the attention input at unit RMS.

RoRoPE (TransMLA, Meng et al., arXiv 2502.07864): RoPE rotates every group's pair p by the same angle, so
any per-pair complex mix of the G groups commutes with it. Per kept pair we take the principal component
s_p = sum_g a_g z_g (weighted by how much the queries read each group, `rope_coefficients`) as the shared rope
key, and write each group's key as z_g = w_g s_p + r_g: the first term keeps its rotation exactly, the
remainder r_g (small when the groups' keys are alike at that frequency) becomes a NoPE key. Unlike partial
RoPE (MHA2MLA, `convert_mla.py`), nothing is dropped: with Dr = D every frequency keeps its rotation through
the shared key, and only the part of the groups' keys outside their common component loses it.

Each head's query/key width becomes D (NoPE: its group's key, all pairs, minus the rope part) + Dr (rope):
q_h . k = Re(q conj(w_g s)) + Re(q conj(r_g)) exactly when nothing is truncated. MLA scales logits by
(D + Dr)^-0.5 where GQA used D^-0.5, so the queries are multiplied by sqrt((D + Dr) / D) (TransMLA step 5).

The NoPE keys and the values of all groups share one latent of rank R: the principal subspace of their outputs
on calibration inputs (TransMLA's PCA on activations), after scaling the keys so their energy matches the
values' (its "balanced K/V", BKV: without it the larger of the two takes the whole rank). With the latent
RMSNorm on (transformers' DeepseekV3 always has it) its weight is the least-squares scalar that undoes the
average scale; with it off (`kv_latent_norm=False`) the latent is used as projected.

All arithmetic is float64 on CPU.
"""

from __future__ import annotations

import math

import torch

from nanoseek.convert.mla import MLAWeights, _complex_pairs, fill_spare_latent, mix_rows, rope_coefficients


def rope_and_nope_keys(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                       pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Split each group's key into the shared rope key (on `pairs`) and a NoPE remainder.

    wq: [H*D, dim], wk: [G*D, dim], u: [N, dim] -> (rope query rows [H, Dr, dim], rope key rows [Dr, dim],
    NoPE key rows [G, D, dim], rope residual energy share). Without rotation,
    q_h . k_g = rope_query_h . rope_key + q_h . nope_g exactly, for every input.
    """
    head_dim = wq.shape[0] // n_heads
    a, w, residual = rope_coefficients(wq, wk, u, n_heads, n_groups, pairs)
    q_even, q_odd = _complex_pairs(wq, n_heads, head_dim, pairs)  # [H, n, dim]
    k_even, k_odd = _complex_pairs(wk, n_groups, head_dim, pairs)  # [G, n, dim]
    rope_key = mix_rows(a.T, k_even, k_odd).sum(0)  # [n, 2, dim]: s = sum_g a_g z_g
    w_heads = w.repeat_interleave(n_heads // n_groups, dim=1).T  # [H, n]
    rope_query = mix_rows(w_heads.conj(), q_even, q_odd)  # [H, n, 2, dim]: q * conj(w_g)
    nope = wk.view(n_groups, head_dim // 2, 2, -1).clone()
    nope[:, pairs] -= mix_rows(w.T, rope_key[:, 0], rope_key[:, 1])  # r_g = z_g - w_g s
    return (rope_query.reshape(n_heads, -1, wq.shape[1]), rope_key.reshape(-1, wk.shape[1]),
            nope.reshape(n_groups, head_dim, -1), residual)


def _sqrt_and_inverse(cov: torch.Tensor, damping: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """cov [..., d, d] PSD -> (cov^(1/2), cov^(-1/2)), eigenvalues floored at damping * their mean."""
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp(min=0) + damping * vals.mean(-1, keepdim=True).clamp(min=1e-30)
    root = (vecs * vals.sqrt()[..., None, :]) @ vecs.transpose(-1, -2)
    inverse = (vecs * vals.rsqrt()[..., None, :]) @ vecs.transpose(-1, -2)
    return root, inverse


def attention_weights(wq: torch.Tensor, wo: torch.Tensor, u: torch.Tensor, n_heads: int,
                      n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How much an error in a group's key or value dims matters: a key error e changes head h's logit by q_h . e,
    so E[(q_h . e)^2] = e^T E[q_h q_h^T] e; a value error changes the output by wo_h e. Per group, summed over its
    heads: (E[q q^T] [G, D, D], wo_h^T wo_h [G, D, D]). wq: [H*D, dim], wo: [dim, H*D], u: [N, dim]."""
    head_dim = wq.shape[0] // n_heads
    q = (u @ wq.T).view(-1, n_groups, n_heads // n_groups, head_dim)  # [N, G, H/G, D]
    query_cov = torch.einsum("tghd,tghe->gde", q, q) / u.shape[0]
    out = wo.view(wo.shape[0], n_groups, n_heads // n_groups, head_dim)  # [dim, G, H/G, D]
    output_cov = torch.einsum("ighd,ighe->gde", out, out)
    return query_cov, output_cov


def _fit_latent(down: torch.Tensor, up: torch.Tensor, u: torch.Tensor, outputs: torch.Tensor, eps: float,
                norm: bool) -> tuple[float, float]:
    """(latent norm weight, relative error of the reconstructed outputs [N, rows]) for down [R, dim], up [rows, R]
    on u [N, dim]; the weight is the least-squares scalar with `norm`, else 1."""
    latent = u @ down.T  # [N, R]
    if not norm:
        return 1.0, float((outputs - latent @ up.T).norm() / outputs.norm().clamp(min=1e-30))
    pred = (latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + eps)) @ up.T
    gamma = float((outputs * pred).sum() / pred.pow(2).sum().clamp(min=1e-30))
    return gamma, float((outputs - gamma * pred).norm() / outputs.norm().clamp(min=1e-30))


ANCHOR_SCALE = 30.0  # the anchor's RMS over the rest of the latent's: the rest moves the norm by ~1 / 2 ANCHOR^2


def _steady_latent_norm(down: torch.Tensor, up: torch.Tensor, k: int, u: torch.Tensor) -> None:
    """Make |latent| = |down u| nearly the same for every token, so that the latent RMSNorm (which transformers'
    DeepseekV3 always applies) acts as a constant the norm's weight undoes. In place; down [R, dim], up [rows, R],
    rows :k in use, u [N, dim] at unit RMS.

    With spare rows (k < R): orthonormal rows, the rest filled from u (|latent| ~ |u| = sqrt(dim)). Without:
    the last (weakest) component gives way to an anchor, the direction w whose projection of u is the most nearly
    constant (largest mean over spread: w = Sigma^-1 mu), scaled to dominate the latent's RMS; it reads nothing
    (its column of up is zero).
    """
    rank = down.shape[0]
    if k < rank:
        q, r = torch.linalg.qr(down[:k].T)  # down[:k] = r^T q^T
        down[:k], up[:, :k] = q.T, up[:, :k] @ r.T
        fill_spare_latent(down, k, u)
        return
    mean = u.mean(0)
    cov = torch.cov(u.T)
    cov = cov + 1e-6 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    w = torch.linalg.solve(cov, mean)
    w = w / (u @ w).mean()
    rest = (u @ down[:rank - 1].T).pow(2).mean().sqrt()  # RMS of one latent dim among the others
    down[rank - 1] = w * ANCHOR_SCALE * rest * math.sqrt(rank)
    up[:, rank - 1] = 0


def balanced_latent(keys: torch.Tensor, values: torch.Tensor, u: torch.Tensor, rank: int, eps: float,
                    norm: bool, key_cov: torch.Tensor | None = None,
                    value_cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One latent for the NoPE keys and values of all groups: PCA of [keys / alpha; values] on u.

    keys: [G, Dk, dim], values: [G, Dv, dim], u: [N, dim]; alpha^2 = E|keys u|^2 / E|values u|^2.
    Returns (down [R, dim], up [G*(Dk+Dv), R] with rows per group [keys; values], kv_norm weight [R],
    relative error of keys and values on u, each weighted as balanced). With `norm` the latent is RMS-normalised
    before `up` (the weight is the least-squares scalar); without, the weight is 1 and unused.
    """
    groups, dk, dim = keys.shape
    # Optional importance weighting (attention_weights): PCA in the space where squared error is what matters.
    key_in = value_in = None
    if key_cov is not None:
        key_root, key_in = _sqrt_and_inverse(key_cov)
        keys = key_root @ keys
    if value_cov is not None:
        value_root, value_in = _sqrt_and_inverse(value_cov)
        values = value_root @ values
    k_out, v_out = u @ keys.reshape(-1, dim).T, u @ values.reshape(-1, dim).T
    alpha = float((k_out.pow(2).mean() / v_out.pow(2).mean().clamp(min=1e-30)).sqrt().clamp(min=1e-30))
    m = torch.cat([keys / alpha, values], dim=1).reshape(-1, dim)  # [G*(Dk+Dv), dim]
    outputs = u @ m.T  # [N, rows]
    eigvals, eigvecs = torch.linalg.eigh(outputs.T @ outputs / u.shape[0])
    k = min(rank, int((eigvals > 1e-12 * eigvals[-1].clamp(min=1e-300)).sum()))  # the outputs' numerical rank
    basis = eigvecs[:, eigvecs.shape[1] - k:].flip(-1)  # [rows, k]
    down = torch.zeros(rank, dim, dtype=m.dtype)
    up = torch.zeros(m.shape[0], rank, dtype=m.dtype)
    down[:k], up[:, :k] = basis.T @ m, basis
    gamma, error = _fit_latent(down, up, u, outputs, eps, norm)
    if norm:  # keep the steadier-norm version only where it measures better (an anchor needs a steady direction)
        steady_down, steady_up = down.clone(), up.clone()
        _steady_latent_norm(steady_down, steady_up, k, u)
        steady_gamma, steady_error = _fit_latent(steady_down, steady_up, u, outputs, eps, norm)
        if steady_error < error:
            down, up, gamma, error = steady_down, steady_up, steady_gamma, steady_error
    scale = torch.ones(groups, dk + values.shape[1], 1, dtype=m.dtype)
    scale[:, :dk] = alpha  # undo the balancing on the key rows
    up = up.view(groups, dk + values.shape[1], rank) * scale
    if key_in is not None:
        up = torch.cat([key_in @ up[:, :dk], up[:, dk:]], dim=1)
    if value_in is not None:
        up = torch.cat([up[:, :dk], value_in @ up[:, dk:]], dim=1)
    up = up.reshape(-1, rank)
    return down, up, torch.full((rank,), gamma, dtype=m.dtype), error


def convert_attention_rorope(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                             norm_weight: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                             pairs: list[int], kv_lora_rank: int, eps: float, kv_norm: bool = True,
                             weighting: str = "attention") -> MLAWeights:
    """One GQA layer's weights -> MLA weights (qk_nope_head_dim = v_head_dim = D, qk_rope_head_dim = 2 len(pairs))
    reading the same input with attn_norm's weight set to 1.

    wq: [H*D, dim], wk, wv: [G*D, dim], wo: [dim, H*D], norm_weight: [dim], u: [N, dim] calibration inputs at
    unit RMS, pairs: the RoPE pairs the shared key keeps (ascending), kv_norm: whether the latent is normalised,
    weighting: "attention" (latent PCA weighted by `attention_weights`) or "balanced" (BKV only).
    """
    wq, wk, wv = (w * norm_weight for w in (wq, wk, wv))
    head_dim = wq.shape[0] // n_heads
    per_group = n_heads // n_groups
    rope_query, rope_key, nope, rope_error = rope_and_nope_keys(wq, wk, u, n_heads, n_groups, pairs)
    values = wv.view(n_groups, head_dim, -1)
    covs = attention_weights(wq, wo, u, n_heads, n_groups) if weighting == "attention" else (None, None)
    down, up, gamma, kv_error = balanced_latent(nope, values, u, kv_lora_rank, eps, kv_norm, *covs)
    wkv_b = up.view(n_groups, 1, 2 * head_dim, -1).expand(-1, per_group, -1, -1)  # a group's rows for its heads
    q_scale = math.sqrt((head_dim + 2 * len(pairs)) / head_dim)  # MLA's 1/sqrt(D + Dr) back to GQA's 1/sqrt(D)
    new_wq = torch.cat([wq.view(n_heads, head_dim, -1), rope_query], dim=1).reshape(-1, wq.shape[1]) * q_scale
    m = torch.cat([nope, values], dim=1).reshape(-1, wk.shape[1])
    svd = torch.linalg.svdvals(m)
    svd_error = float(svd[kv_lora_rank:].pow(2).sum().sqrt() / svd.pow(2).sum().sqrt().clamp(min=1e-30))
    return MLAWeights(new_wq, torch.cat([down, rope_key]), gamma, wkv_b.reshape(-1, kv_lora_rank), wo.clone(),
                      svd_error, kv_error, rope_error)


__all__ = ["balanced_latent", "convert_attention_rorope", "rope_and_nope_keys"]
