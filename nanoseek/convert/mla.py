"""GQA -> MLA weight surgery for one attention layer (used by `convert.py`).

Notation: H query heads of head_dim D in G key/value groups (head h reads group h // (H/G)); P = D/2 RoPE
frequency pairs, pair p = dims (2p, 2p+1) rotating at theta^(-2p/D) (nanoseek's interleaved layout).
u is the attention input before the attention norm's weight: x = attn_norm.weight * u, and u has unit RMS.

The converted layer (nanoseek MLAttention, q_lora_rank=0, head dims: nope D - Dr, rope Dr, value D) works as:

* RoPE on a subset of Dr/2 frequency pairs, kept in one rope key shared by all heads (DeepSeek-V2 section
  2.1.3). Partial RoPE as in MHA2MLA (Ji et al., arXiv 2502.14837): the other pairs lose their rotation and
  become NoPE dims. Which pairs: the ones with the largest query/key norm product (MHA2MLA's 2-norm score),
  among the subsets a standard rope can express (see `choose_rope_pairs`).
* With G > 1 groups the shared rope key is, per frequency, the principal component of the G groups' keys
  (a complex PCA: a complex scalar commutes with the rotation, so mixing groups per frequency is exact
  algebra; the idea of TransMLA's RoRoPE, Meng et al., arXiv 2502.07864). Each query head absorbs its
  group's complex coefficient. With G = 1 this is exact; with G > 1 the other components are lost.
* The NoPE key dims and the values of all groups come from one latent: a truncated SVD of the stacked
  [W_k(nope); W_v] of all groups (MHA2MLA's joint SVD, orthonormal down-projection W_DKV = V_r^T, up =
  U_r S_r), by default weighted by the calibration inputs' covariance (see `latent_projections`). Spare
  latent dims beyond the SVD's rank are filled with the principal directions of u that the SVD does not
  use: they carry nothing to the heads, but make the latent's norm follow |u| (constant), which is what
  lets the latent RMSNorm (kv_norm) act as a constant. Its weight is the least-squares scalar that undoes
  its average scale. With a latent of rank >= dim the NoPE keys and values are exact (up to the attention
  norm's eps, which keeps |u| from being exactly constant); below, the per-token normalisation is the part
  no weight choice can undo.

All arithmetic is float64 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RopeChoice:
    """The RoPE pairs kept: pair o + s*j for slot j < n, which a standard rope over 2n dims expresses with
    rope_theta' = theta^(2 n s / D) and a linear rope factor theta^(2 o / D)."""

    offset: int
    stride: int
    n_pairs: int
    kept_score: float  # fraction of the summed 2-norm score these pairs hold
    best_score: float  # what the best n pairs, unconstrained, would hold (the bound)

    @property
    def pairs(self) -> list[int]:
        return [self.offset + self.stride * j for j in range(self.n_pairs)]


def pair_scores(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int) -> torch.Tensor:
    """MHA2MLA's 2-norm score of each frequency pair: sum over heads of mean_t |q_h,p| * mean_t |k_g(h),p|.

    wq: [H*D, dim], wk: [G*D, dim] (already multiplied by the attention norm's weight), u: [N, dim]
    -> [P], summed over heads.
    """
    head_dim = wq.shape[0] // n_heads
    q = (u @ wq.T).view(-1, n_heads, head_dim // 2, 2).norm(dim=-1).mean(0)  # [H, P]
    k = (u @ wk.T).view(-1, n_groups, head_dim // 2, 2).norm(dim=-1).mean(0)  # [G, P]
    return (q * k.repeat_interleave(n_heads // n_groups, dim=0)).sum(0)


def choose_rope_pairs(scores: torch.Tensor, n_pairs: int) -> RopeChoice:
    """The arithmetic progression of `n_pairs` pairs (offset o, stride s) with the largest summed score.

    scores: [P] per pair, summed over layers (one rope config serves every layer). An arbitrary subset (MHA2MLA
    picks the top pairs per head) has no standard-rope config, so transformers' DeepseekV3 could not load it
    exactly; progressions can: they include MHA2MLA's `high` (o=0, s=1), `low` and `uniform` (stride) choices.
    """
    n_total = scores.numel()
    total = float(scores.sum()) or 1.0
    best = None
    max_stride = (n_total - 1) // (n_pairs - 1) if n_pairs > 1 else 1
    for stride in range(1, max_stride + 1):
        for offset in range(0, n_total - stride * (n_pairs - 1)):
            kept = float(scores[offset:offset + stride * (n_pairs - 1) + 1:stride].sum())
            if best is None or kept > best[0] + 1e-12 * total:
                best = (kept, offset, stride)
    top = float(scores.topk(n_pairs).values.sum())
    return RopeChoice(best[1], best[2], n_pairs, best[0] / total, top / total)


@dataclass
class MLAWeights:
    """One converted layer's tensors, shaped as MLAttention's (float64)."""

    wq: torch.Tensor  # [H*(Dn+Dr), dim]
    wkv_a: torch.Tensor  # [R+Dr, dim]
    kv_norm: torch.Tensor  # [R]
    wkv_b: torch.Tensor  # [H*(Dn+D), R]
    wo: torch.Tensor  # [dim, H*D]
    svd_error: float  # relative Frobenius error of the rank-R [W_k(nope); W_v]
    kv_error: float  # relative error of NoPE keys and values on the calibration tokens, kv_norm included
    rope_error: float  # energy share of the rope keys the shared key misses (0 with one KV group)


def _complex_pairs(w: torch.Tensor, n_rows: int, head_dim: int, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the selected pairs: w [n_rows*D, dim] -> (even rows, odd rows), each [n_rows, n, dim]."""
    heads = w.view(n_rows, head_dim // 2, 2, -1)[:, pairs]
    return heads[:, :, 0], heads[:, :, 1]


def rope_coefficients(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                      pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per selected pair, one shared component s = sum_g a_g z_g of the groups' complex keys
    z_g = k_g,2p + i k_g,2p+1 (linear in u), and z_g ~= w_g s.

    s is the top eigenvector of E[y y^H], y_g = sqrt(lambda_g) z_g, where lambda_g is the query energy of group
    g at that pair (errors weighted by how much the queries read them). A complex scalar commutes with the
    rotation, so mixing groups per frequency is exact algebra (TransMLA's RoRoPE, arXiv 2502.07864).
    wq: [H*D, dim], wk: [G*D, dim], u: [N, dim] -> (a [n, G], w [n, G] complex, residual energy share).
    """
    head_dim = wq.shape[0] // n_heads
    per_group = n_heads // n_groups
    q_even, q_odd = _complex_pairs(wq, n_heads, head_dim, pairs)  # [H, n, dim]
    k_even, k_odd = _complex_pairs(wk, n_groups, head_dim, pairs)  # [G, n, dim]
    z = torch.complex(torch.einsum("td,gnd->tgn", u, k_even), torch.einsum("td,gnd->tgn", u, k_odd))  # [N, G, n]
    q_energy = (torch.einsum("td,hnd->thn", u, q_even) ** 2 + torch.einsum("td,hnd->thn", u, q_odd) ** 2).mean(0)
    lam = q_energy.view(n_groups, per_group, -1).sum(1)  # [G, n]
    lam = lam + 1e-12 * lam.max().clamp(min=1e-30)
    y = z * lam.sqrt()  # [N, G, n]
    cov = torch.einsum("tgn,thn->ngh", y, y.conj()) / y.shape[0]  # [n, G, G], E[y y^H], Hermitian
    eigvals, eigvecs = torch.linalg.eigh(cov)
    v = eigvecs[..., -1]  # [n, G], top component of each pair
    anchor = v.abs().argmax(-1, keepdim=True)
    phase = v.gather(-1, anchor)
    v = v * (phase.conj() / phase.abs().clamp(min=1e-30))  # fix the eigenvector's free phase
    lam_t = lam.T  # [n, G]
    nu = (v.abs() ** 2 * lam_t).sum(-1, keepdim=True).sqrt()
    a = v.conj() * lam_t.sqrt() / nu  # s = sum_g a_g z_g
    w = v * nu / lam_t.sqrt()  # z_g ~= w_g s
    total = cov.diagonal(dim1=-2, dim2=-1).real.sum()
    residual = float((total - eigvals[:, -1].sum()) / total.clamp(min=1e-30))
    return a, w, max(residual, 0.0)


def mix_rows(coef: torch.Tensor, even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Rows of coef * z for z = even + i odd (rows of a linear map): coef [..., n], even/odd [..., n, dim]
    -> [..., n, 2, dim] (real part rows, imaginary part rows)."""
    re, im = coef.real[..., None], coef.imag[..., None]
    return torch.stack([re * even - im * odd, re * odd + im * even], dim=-2)


def shared_rope_key(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                    pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The shared rope key and the queries that read it (see `rope_coefficients`).

    A query pair q of group g becomes q * conj(w_g): Re(q conj(w_g) conj(s)) ~= Re(q conj(z_g)) = q . k.
    wq: [H*D, dim], wk: [G*D, dim], u: [N, dim] -> (rope query rows [H, Dr, dim], rope key rows [Dr, dim],
    residual energy share).
    """
    head_dim = wq.shape[0] // n_heads
    a, w, residual = rope_coefficients(wq, wk, u, n_heads, n_groups, pairs)
    q_even, q_odd = _complex_pairs(wq, n_heads, head_dim, pairs)  # [H, n, dim]
    k_even, k_odd = _complex_pairs(wk, n_groups, head_dim, pairs)  # [G, n, dim]
    rope_key = mix_rows(a.T, k_even, k_odd).sum(0)  # [G, n, 2, dim] summed over groups -> [n, 2, dim]
    w_heads = w.repeat_interleave(n_heads // n_groups, dim=1).T  # [H, n]
    rope_query = mix_rows(w_heads.conj(), q_even, q_odd)  # [H, n, 2, dim]
    return rope_query.reshape(n_heads, -1, wq.shape[1]), rope_key.reshape(-1, wk.shape[1]), residual


def fill_spare_latent(down: torch.Tensor, k: int, u: torch.Tensor) -> None:
    """Fill rows k.. of down [R, dim] (rows :k orthonormal) with the principal directions of u [N, dim] outside
    their span, in place: they carry nothing to the heads, but keep |latent| ~ |u| (constant at unit RMS), so
    the latent RMSNorm acts as a constant."""
    dim = down.shape[1]
    spare = min(down.shape[0], dim) - k
    if spare <= 0:
        return
    proj = torch.eye(dim, dtype=down.dtype) - down[:k].T @ down[:k]
    cov = proj @ (u.T @ u / u.shape[0]) @ proj
    cov = cov + 1e-9 * proj * cov.diagonal().mean().clamp(min=1e-30)  # u may span fewer dims than dim
    down[k:k + spare] = torch.linalg.eigh(cov).eigenvectors[:, -spare:].flip(-1).T


def latent_projections(m: torch.Tensor, u: torch.Tensor, rank: int, eps: float, weighted: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Joint low-rank latent for M = [W_k(nope); W_v] of all groups, with kv_norm folded.

    Below M's full rank, `weighted` truncates the SVD of M Sigma^(1/2) (Sigma = E[u u^T] on the calibration
    tokens), i.e. keeps the principal subspace of the keys and values themselves (TransMLA's PCA on outputs)
    rather than of the weights (MHA2MLA): real models' inputs have a few huge dims, which the plain weight
    SVD does not see. At full rank both are exact and the orthonormal weight-SVD form is used.
    m: [rows, dim], u: [N, dim] -> (down [R, dim], up [rows, R], kv_norm weight [R], svd_error, kv_error);
    svd_error is the relative Frobenius error of the rank-R approximation of M.
    """
    dim = m.shape[1]
    left, sing, right_t = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, sing.numel())
    down = torch.zeros(rank, dim, dtype=m.dtype)
    up = torch.zeros(m.shape[0], rank, dtype=m.dtype)
    if weighted and k < sing.numel():
        outputs = u @ m.T  # [N, rows]
        basis = torch.linalg.eigh(outputs.T @ outputs / u.shape[0]).eigenvectors[:, -k:].flip(-1)  # [rows, k]
        down[:k], up[:, :k] = basis.T @ m, basis
        svd_error = float((m - basis @ (basis.T @ m)).norm() / m.norm().clamp(min=1e-30))
    else:
        down[:k] = right_t[:k]
        up[:, :k] = left[:, :k] * sing[:k]
        svd_error = float(sing[k:].pow(2).sum().sqrt() / sing.pow(2).sum().sqrt().clamp(min=1e-30))
    fill_spare_latent(down, k, u)
    latent = u @ down.T  # [N, R]
    normed = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + eps)
    target, pred = u @ m.T, normed @ up.T
    gamma = float((target * pred).sum() / pred.pow(2).sum().clamp(min=1e-30))
    kv_error = float((target - gamma * pred).norm() / target.norm().clamp(min=1e-30))
    return down, up, torch.full((rank,), gamma, dtype=m.dtype), svd_error, kv_error


def convert_attention(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                      norm_weight: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                      pairs: list[int], kv_lora_rank: int, eps: float, weighted: bool = True) -> MLAWeights:
    """One GQA layer's weights -> MLA weights reading the same input with attn_norm's weight set to 1.

    wq: [H*D, dim], wk, wv: [G*D, dim], wo: [dim, H*D], norm_weight: [dim] (attn_norm.weight, folded into the
    projections), u: [N, dim] calibration inputs at unit RMS, pairs: the kept RoPE pairs (ascending),
    weighted: see `latent_projections`.
    """
    wq, wk, wv = (w * norm_weight for w in (wq, wk, wv))
    head_dim = wq.shape[0] // n_heads
    per_group = n_heads // n_groups
    nope_pairs = [p for p in range(head_dim // 2) if p not in set(pairs)]
    nope_dims = [2 * p + i for p in nope_pairs for i in (0, 1)]
    rope_query, rope_key, rope_error = shared_rope_key(wq, wk, u, n_heads, n_groups, pairs)
    k_nope = wk.view(n_groups, head_dim, -1)[:, nope_dims]  # [G, Dn, dim]
    values = wv.view(n_groups, head_dim, -1)  # [G, D, dim]
    m = torch.cat([k_nope, values], dim=1).reshape(-1, wk.shape[1])  # [G*(Dn+D), dim]
    down, up, gamma, svd_error, kv_error = latent_projections(m, u, kv_lora_rank, eps, weighted)
    # The latent's up-projection per group, repeated for the heads that read the group.
    wkv_b = up.view(n_groups, 1, len(nope_dims) + head_dim, -1).expand(-1, per_group, -1, -1)
    q_nope = wq.view(n_heads, head_dim, -1)[:, nope_dims]
    new_wq = torch.cat([q_nope, rope_query], dim=1).reshape(-1, wq.shape[1])
    # MLA scales logits by (Dn+Dr)^-0.5 = D^-0.5, as GQA did: no query rescaling is needed.
    assert len(nope_dims) + 2 * len(pairs) == head_dim
    return MLAWeights(new_wq, torch.cat([down, rope_key]), gamma, wkv_b.reshape(-1, kv_lora_rank), wo.clone(),
                      svd_error, kv_error, rope_error)


def rope_config(theta: float, factor: float, head_dim: int, choice: RopeChoice) -> tuple[float, float]:
    """(rope_theta', linear factor') of a 2n-dim rope whose frequency j is the original pair o + s*j.

    theta^(-2(o + s j)/D) / F = (theta^(2 n s / D))^(-2j / 2n) / (F * theta^(2 o / D)).
    """
    rope_dims = 2 * choice.n_pairs
    return theta ** (choice.stride * rope_dims / head_dim), factor * theta ** (2 * choice.offset / head_dim)


__all__ = ["MLAWeights", "RopeChoice", "choose_rope_pairs", "convert_attention", "mix_rows", "pair_scores",
           "rope_coefficients", "rope_config", "shared_rope_key", "latent_projections"]
