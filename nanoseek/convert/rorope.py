"""GQA -> MLA for one attention layer keeping every RoPE frequency that fits (the default `--method rorope`).

Notation as in mla.py. RoRoPE (TransMLA, Meng et al., arXiv 2502.07864): RoPE rotates every group's pair p by the
same angle, so any per-pair complex mix of the G groups commutes with it. Per kept pair the principal component
s_p = sum_g a_g z_g is the shared rope key, and each group's key is z_g = w_g s_p + r_g: the first term keeps its
rotation exactly, the remainder r_g (small when the groups' keys are alike at that frequency) becomes a NoPE key.
Unlike partial RoPE (MHA2MLA, mla.py) nothing is dropped: q_h . k = Re(q conj(w_g s)) + Re(q conj(r_g)) exactly.
The NoPE keys and the values then share one latent: the principal subspace of their outputs on calibration inputs
(TransMLA's PCA on activations), the keys scaled so their energy matches the values' (its balanced K/V, BKV:
without it the larger of the two takes the whole rank). All arithmetic is float64 on CPU."""

import math

import torch

from nanoseek.convert.mla import (MLAWeights, _fit_latent, fill_spare_latent, mix_rows, per_head, shared_rope_key,
                                  truncation_error, zero_padded)

ANCHOR_SCALE = 30.0  # the anchor's RMS over the rest of the latent's: the rest moves the norm by ~1 / 2 ANCHOR^2


def rope_and_nope_keys(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                       pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Each group's key split into the shared rope key and a NoPE remainder, so that without rotation
    q_h . k_g = rope_query_h . rope_key + q_h . nope_g exactly: (rope query rows [H, Dr, dim], rope key rows
    [Dr, dim], NoPE key rows [G, D, dim], residual energy share)."""
    rope_query, rope_key, w, residual = shared_rope_key(wq, wk, u, n_heads, n_groups, pairs)
    nope = wk.view(n_groups, -1, 2, wk.shape[1]).clone()  # [G, D/2, 2, dim]
    nope[:, pairs] -= mix_rows(w.T, rope_key[:, 0], rope_key[:, 1])  # r_g = z_g - w_g s
    return rope_query.reshape(n_heads, -1, wq.shape[1]), rope_key.reshape(-1, wk.shape[1]), nope.flatten(1, 2), residual


def _weighted(rows: torch.Tensor, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cov^(1/2) rows, cov^(-1/2)) for cov [..., d, d] PSD, its eigenvalues floored at 1e-3 * their mean;
    (rows, None) without cov."""
    if cov is None:
        return rows, None
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp(min=0) + 1e-3 * vals.mean(-1, keepdim=True).clamp(min=1e-30)
    root = (vecs * vals.sqrt()[..., None, :]) @ vecs.transpose(-1, -2)
    return root @ rows, (vecs * vals.rsqrt()[..., None, :]) @ vecs.transpose(-1, -2)


def attention_weights(wq: torch.Tensor, wo: torch.Tensor, u: torch.Tensor, n_heads: int,
                      n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How much an error in a group's key or value dims matters, summed over its heads: a key error e changes head
    h's logit by q_h . e, a value error the output by wo_h e -> (E[q q^T] [G, D, D], wo_h^T wo_h [G, D, D])."""
    head_dim = wq.shape[0] // n_heads
    q = (u @ wq.T).view(-1, n_groups, n_heads // n_groups, head_dim)  # [N, G, H/G, D]
    out = wo.view(wo.shape[0], n_groups, n_heads // n_groups, head_dim)  # [dim, G, H/G, D]
    return torch.einsum("tghd,tghe->gde", q, q) / u.shape[0], torch.einsum("ighd,ighe->gde", out, out)


def _steady_latent_norm(down: torch.Tensor, up: torch.Tensor, k: int, u: torch.Tensor) -> None:
    """Make |latent| = |down u| nearly the same for every token (in place; rows :k in use), so that the latent
    RMSNorm acts as a constant. With spare rows: orthonormal rows, the rest filled from u. Without: the weakest
    component gives way to an anchor that reads nothing, the direction whose projection of u is the most nearly
    constant (w = Sigma^-1 mu), scaled to dominate the latent's RMS."""
    rank = down.shape[0]
    if k < rank:
        q, r = torch.linalg.qr(down[:k].T)  # down[:k] = r^T q^T
        down[:k], up[:, :k] = q.T, up[:, :k] @ r.T
        fill_spare_latent(down, k, u)
        return
    cov = torch.cov(u.T)
    cov = cov + 1e-6 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    w = torch.linalg.solve(cov, u.mean(0))
    w = w / (u @ w).mean()
    rest = (u @ down[:rank - 1].T).pow(2).mean().sqrt()  # RMS of one latent dim among the others
    down[rank - 1] = w * ANCHOR_SCALE * rest * math.sqrt(rank)
    up[:, rank - 1] = 0


def balanced_latent(keys: torch.Tensor, values: torch.Tensor, u: torch.Tensor, rank: int, eps: float,
                    norm: bool, key_cov: torch.Tensor | None = None,
                    value_cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One latent for the NoPE keys and values of all groups: PCA of [keys / alpha; values] on u (alpha^2 =
    E|keys u|^2 / E|values u|^2), optionally weighted by key_cov / value_cov (`attention_weights`).
    keys: [G, Dk, dim], values: [G, Dv, dim], u: [N, dim] -> (down [R, dim], up [G*(Dk+Dv), R], kv_norm weight [R]
    (1 without `norm`), relative error of the balanced keys and values)."""
    groups, dk, dim = keys.shape
    keys, key_in = _weighted(keys, key_cov)
    values, value_in = _weighted(values, value_cov)
    k_out, v_out = u @ keys.reshape(-1, dim).T, u @ values.reshape(-1, dim).T
    alpha = float((k_out.pow(2).mean() / v_out.pow(2).mean().clamp(min=1e-30)).sqrt().clamp(min=1e-30))
    m = torch.cat([keys / alpha, values], dim=1).reshape(-1, dim)  # [G*(Dk+Dv), dim]
    outputs = u @ m.T  # [N, rows]
    eigvals, eigvecs = torch.linalg.eigh(outputs.T @ outputs / u.shape[0])
    k = min(rank, int((eigvals > 1e-12 * eigvals[-1].clamp(min=1e-300)).sum()))  # the outputs' numerical rank
    basis = eigvecs[:, eigvecs.shape[1] - k:].flip(-1)  # [rows, k]
    down, up = zero_padded(basis.T @ m, basis, rank)  # [R, dim], [rows, R]
    gamma, error = _fit_latent(down, up, u, outputs, eps, norm)
    if norm:  # keep the steadier-norm version only where it measures better (an anchor needs a steady direction)
        steady_down, steady_up = down.clone(), up.clone()
        _steady_latent_norm(steady_down, steady_up, k, u)
        steady_gamma, steady_error = _fit_latent(steady_down, steady_up, u, outputs, eps, norm)
        if steady_error < error:
            down, up, gamma, error = steady_down, steady_up, steady_gamma, steady_error
    up = up.view(groups, -1, rank)  # undo the balancing, then the weighting
    up_k = up[:, :dk] * alpha if key_in is None else key_in @ (up[:, :dk] * alpha)
    up_v = up[:, dk:] if value_in is None else value_in @ up[:, dk:]
    return down, torch.cat([up_k, up_v], dim=1).reshape(-1, rank), torch.full((rank,), gamma, dtype=m.dtype), error


def convert_attention_rorope(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                             norm_weight: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                             pairs: list[int], kv_lora_rank: int, eps: float, kv_norm: bool = True,
                             weighting: str = "attention") -> MLAWeights:
    """One GQA layer -> MLA weights (nope and value head dims D, rope 2 len(pairs)); arguments as in mla.py, weighting
    "attention" (`attention_weights`) or "balanced" (BKV only)."""
    wq, wk, wv = (w * norm_weight for w in (wq, wk, wv))
    head_dim = wq.shape[0] // n_heads
    rope_query, rope_key, nope, rope_error = rope_and_nope_keys(wq, wk, u, n_heads, n_groups, pairs)
    values = wv.view(n_groups, head_dim, -1)
    covs = attention_weights(wq, wo, u, n_heads, n_groups) if weighting == "attention" else (None, None)
    down, up, gamma, kv_error = balanced_latent(nope, values, u, kv_lora_rank, eps, kv_norm, *covs)
    # MLA scales logits by (D + Dr)^-0.5 where GQA used D^-0.5: the queries make up the difference (TransMLA step 5).
    q_scale = math.sqrt((head_dim + 2 * len(pairs)) / head_dim)
    new_wq = torch.cat([wq.view(n_heads, head_dim, -1), rope_query], dim=1).reshape(-1, wq.shape[1]) * q_scale
    svd_error = truncation_error(torch.linalg.svdvals(torch.cat([nope, values], dim=1).flatten(0, 1)), kv_lora_rank)
    return MLAWeights(new_wq, torch.cat([down, rope_key]), gamma, per_head(up, n_heads, n_groups), wo.clone(),
                      svd_error, kv_error, rope_error)
