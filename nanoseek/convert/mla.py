"""GQA -> MLA for one attention layer by partial RoPE (`--method partial`), and the pieces rorope.py shares.

Notation: H query heads of head_dim D in G key/value groups (head h reads group h // (H/G)); pair p = dims
(2p, 2p+1); z_g = k_g,2p + i k_g,2p+1 the complex key of group g at pair p; u the attention input at unit RMS.
RoPE stays on Dr/2 pairs in one rope key shared by all heads (DeepSeek-V2 section 2.1.3); as in MHA2MLA (Ji et al.,
arXiv 2502.14837) the other pairs become NoPE dims. With G > 1 groups the rope key is, per pair, the groups'
principal component (RoRoPE: rorope.py). NoPE keys and values share one latent, a truncated SVD of [W_k(nope); W_v]
(MHA2MLA's joint SVD), whose spare dims keep |latent| ~ |u| so that the latent RMSNorm is a constant."""

from dataclasses import dataclass

import torch


@dataclass
class RopeChoice:
    """The RoPE pairs kept: pair offset + stride * j for slot j < n_pairs (a standard rope: `rope_config`)."""

    offset: int
    stride: int
    n_pairs: int
    kept_score: float  # fraction of the summed 2-norm score these pairs hold
    best_score: float  # what the best n pairs, unconstrained, would hold (the bound)

    @property
    def pairs(self) -> list[int]:
        return [self.offset + self.stride * j for j in range(self.n_pairs)]


@dataclass
class MLAWeights:
    wq: torch.Tensor  # [H*(Dn+Dr), dim]
    wkv_a: torch.Tensor  # [R+Dr, dim]
    kv_norm: torch.Tensor  # [R]
    wkv_b: torch.Tensor  # [H*(Dn+Dv), R]
    wo: torch.Tensor  # [dim, H*Dv]
    svd_error: float  # relative Frobenius error of the rank-R [W_k(nope); W_v]
    kv_error: float  # relative error of NoPE keys and values on the calibration tokens, kv_norm included
    rope_error: float  # energy share of the rope keys the shared key misses (0 with one KV group)


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((reference - x).norm() / reference.norm().clamp(min=1e-30))


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-`rank` approximation."""
    return float(singular_values[rank:].norm() / singular_values.norm().clamp(min=1e-30))


def pair_scores(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int) -> torch.Tensor:
    """MHA2MLA's 2-norm score of each frequency pair, sum_h mean_t |q_h,p| * mean_t |k_g(h),p|: [P].
    wq: [H*D, dim], wk: [G*D, dim] (attn_norm's weight folded in), u: [N, dim]."""
    head_dim = wq.shape[0] // n_heads
    q = (u @ wq.T).view(-1, n_heads, head_dim // 2, 2).norm(dim=-1).mean(0)  # [H, P]
    k = (u @ wk.T).view(-1, n_groups, head_dim // 2, 2).norm(dim=-1).mean(0)  # [G, P]
    return (q * k.repeat_interleave(n_heads // n_groups, dim=0)).sum(0)


def choose_rope_pairs(scores: torch.Tensor, n_pairs: int) -> RopeChoice:
    """The arithmetic progression of `n_pairs` pairs with the largest summed score [P]. An arbitrary subset has no
    standard-rope config (transformers could not load it); progressions include MHA2MLA's high, low and uniform."""
    n_total = scores.numel()
    total = float(scores.sum()) or 1.0
    best = None
    max_stride = (n_total - 1) // (n_pairs - 1) if n_pairs > 1 else 1
    for stride in range(1, max_stride + 1):
        for offset in range(0, n_total - stride * (n_pairs - 1)):
            kept = float(scores[offset:offset + stride * (n_pairs - 1) + 1:stride].sum())
            if best is None or kept > best[0] + 1e-12 * total:
                best = (kept, offset, stride)
    return RopeChoice(best[1], best[2], n_pairs, best[0] / total, float(scores.topk(n_pairs).values.sum()) / total)


def rope_config(theta: float, factor: float, head_dim: int, choice: RopeChoice) -> tuple[float, float]:
    """(rope_theta', linear factor') of a 2n-dim rope whose frequency j is the original pair o + s*j:
    theta^(-2(o + s j)/D) / F = (theta^(2 n s / D))^(-2j / 2n) / (F * theta^(2 o / D))."""
    return theta ** (choice.stride * 2 * choice.n_pairs / head_dim), factor * theta ** (2 * choice.offset / head_dim)


def _complex_pairs(w: torch.Tensor, n_rows: int, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the selected pairs: w [n_rows*D, dim] -> (even rows, odd rows), each [n_rows, n, dim]."""
    heads = w.view(n_rows, -1, 2, w.shape[1])[:, pairs]
    return heads[:, :, 0], heads[:, :, 1]


def rope_coefficients(wq: torch.Tensor, wk: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                      pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per selected pair, the groups' shared complex key s = sum_g a_g z_g with z_g ~= w_g s: the top eigenvector of
    E[y y^H], y_g = sqrt(lambda_g) z_g, lambda_g the query energy of group g at that pair (what the queries read).
    wq: [H*D, dim], wk: [G*D, dim], u: [N, dim] -> (a [n, G], w [n, G] complex, residual energy share)."""
    q_even, q_odd = _complex_pairs(wq, n_heads, pairs)  # [H, n, dim]
    k_even, k_odd = _complex_pairs(wk, n_groups, pairs)  # [G, n, dim]
    z = torch.complex(torch.einsum("td,gnd->tgn", u, k_even), torch.einsum("td,gnd->tgn", u, k_odd))  # [N, G, n]
    q_energy = (torch.einsum("td,hnd->thn", u, q_even) ** 2 + torch.einsum("td,hnd->thn", u, q_odd) ** 2).mean(0)
    lam = q_energy.view(n_groups, n_heads // n_groups, -1).sum(1)  # [G, n]
    lam = lam + 1e-12 * lam.max().clamp(min=1e-30)
    y = z * lam.sqrt()  # [N, G, n]
    cov = torch.einsum("tgn,thn->ngh", y, y.conj()) / y.shape[0]  # [n, G, G], E[y y^H], Hermitian
    eigvals, eigvecs = torch.linalg.eigh(cov)
    v = eigvecs[..., -1]  # [n, G], top component of each pair
    phase = v.gather(-1, v.abs().argmax(-1, keepdim=True))
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
                    pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The shared rope key and the queries that read it: a query pair q of group g becomes q * conj(w_g), as
    Re(q conj(w_g) conj(s)) ~= Re(q conj(z_g)) = q . k. -> (rope query rows [H, n, 2, dim], rope key rows
    [n, 2, dim], w [n, G], residual energy share)."""
    a, w, residual = rope_coefficients(wq, wk, u, n_heads, n_groups, pairs)
    q_even, q_odd = _complex_pairs(wq, n_heads, pairs)  # [H, n, dim]
    k_even, k_odd = _complex_pairs(wk, n_groups, pairs)  # [G, n, dim]
    rope_key = mix_rows(a.T, k_even, k_odd).sum(0)  # [G, n, 2, dim] summed over groups: s = sum_g a_g z_g
    w_heads = w.repeat_interleave(n_heads // n_groups, dim=1).T  # [H, n]
    return mix_rows(w_heads.conj(), q_even, q_odd), rope_key, w, residual


def fill_spare_latent(down: torch.Tensor, k: int, u: torch.Tensor) -> None:
    """Fill rows k.. of down [R, dim] (rows :k orthonormal) in place with the principal directions of u [N, dim]
    outside their span: they keep |latent| ~ |u| (constant at unit RMS), so the latent RMSNorm acts as a constant."""
    dim = down.shape[1]
    spare = min(down.shape[0], dim) - k
    if spare <= 0:
        return
    proj = torch.eye(dim, dtype=down.dtype) - down[:k].T @ down[:k]
    cov = proj @ (u.T @ u / u.shape[0]) @ proj
    cov = cov + 1e-9 * proj * cov.diagonal().mean().clamp(min=1e-30)  # u may span fewer dims than dim
    down[k:k + spare] = torch.linalg.eigh(cov).eigenvectors[:, -spare:].flip(-1).T


def _fit_latent(down: torch.Tensor, up: torch.Tensor, u: torch.Tensor, outputs: torch.Tensor, eps: float,
                norm: bool) -> tuple[float, float]:
    """(latent norm weight: least-squares with `norm`, else 1; relative error of outputs [N, rows]) for down
    [R, dim], up [rows, R] on u [N, dim]."""
    latent = u @ down.T  # [N, R]
    if not norm:
        return 1.0, relative_error(latent @ up.T, outputs)
    pred = (latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + eps)) @ up.T
    gamma = float((outputs * pred).sum() / pred.pow(2).sum().clamp(min=1e-30))
    return gamma, relative_error(gamma * pred, outputs)


def zero_padded(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """down [k, dim], up [rows, k] -> contiguous [rank, dim], [rows, rank], zero beyond k."""
    padded_down, padded_up = down.new_zeros(rank, down.shape[1]), up.new_zeros(up.shape[0], rank)
    padded_down[:down.shape[0]], padded_up[:, :up.shape[1]] = down, up
    return padded_down, padded_up


def latent_projections(m: torch.Tensor, u: torch.Tensor, rank: int, eps: float, weighted: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Joint low-rank latent for M = [W_k(nope); W_v], m: [rows, dim], u: [N, dim] -> (down [R, dim], up [rows, R],
    kv_norm weight [R], svd_error, kv_error). Below full rank, `weighted` keeps the principal subspace of the keys
    and values on u (TransMLA's PCA on outputs) rather than of the weights (MHA2MLA): real models' inputs have a
    few huge dims the plain weight SVD does not see."""
    left, sing, right_t = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, sing.numel())
    if weighted and k < sing.numel():
        outputs = u @ m.T  # [N, rows]
        basis = torch.linalg.eigh(outputs.T @ outputs / u.shape[0]).eigenvectors[:, -k:].flip(-1)  # [rows, k]
        down, up = basis.T @ m, basis
        svd_error = relative_error(basis @ down, m)
    else:
        down, up = right_t[:k], left[:, :k] * sing[:k]
        svd_error = truncation_error(sing, k)
    down, up = zero_padded(down, up, rank)  # [R, dim], [rows, R]
    fill_spare_latent(down, k, u)
    gamma, kv_error = _fit_latent(down, up, u, u @ m.T, eps, norm=True)
    return down, up, torch.full((rank,), gamma, dtype=m.dtype), svd_error, kv_error


def per_head(up: torch.Tensor, n_heads: int, n_groups: int) -> torch.Tensor:
    """A group's latent up-projection rows, repeated for each head that reads it: [G*rows, R] -> [H*rows, R]."""
    rank = up.shape[1]
    return up.view(n_groups, 1, -1, rank).expand(-1, n_heads // n_groups, -1, -1).reshape(-1, rank)


def convert_attention(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                      norm_weight: torch.Tensor, u: torch.Tensor, n_heads: int, n_groups: int,
                      pairs: list[int], kv_lora_rank: int, eps: float, weighted: bool = True) -> MLAWeights:
    """One GQA layer -> partial-RoPE MLA weights (head dims: nope D - Dr, rope Dr, value D; logits still scaled by
    D^-0.5). wq: [H*D, dim], wk, wv: [G*D, dim], wo: [dim, H*D], norm_weight: [dim] (attn_norm's, folded in),
    u: [N, dim] calibration inputs at unit RMS, pairs: the kept RoPE pairs (ascending)."""
    wq, wk, wv = (w * norm_weight for w in (wq, wk, wv))
    head_dim = wq.shape[0] // n_heads
    nope_dims = [2 * p + i for p in range(head_dim // 2) if p not in set(pairs) for i in (0, 1)]
    if len(nope_dims) + 2 * len(pairs) != head_dim:
        raise ValueError(f"rope pairs {pairs} must be distinct pair indices below head_dim/2 = {head_dim // 2}")
    rope_query, rope_key, _, rope_error = shared_rope_key(wq, wk, u, n_heads, n_groups, pairs)
    k_nope = wk.view(n_groups, head_dim, -1)[:, nope_dims]  # [G, Dn, dim]
    m = torch.cat([k_nope, wv.view(n_groups, head_dim, -1)], dim=1).reshape(-1, wk.shape[1])  # [G*(Dn+D), dim]
    down, up, gamma, svd_error, kv_error = latent_projections(m, u, kv_lora_rank, eps, weighted)
    q_nope = wq.view(n_heads, head_dim, -1)[:, nope_dims]
    new_wq = torch.cat([q_nope, rope_query.reshape(n_heads, -1, wq.shape[1])], dim=1).reshape(-1, wq.shape[1])
    return MLAWeights(new_wq, torch.cat([down, rope_key.reshape(-1, wk.shape[1])]), gamma,
                      per_head(up, n_heads, n_groups), wo.clone(), svd_error, kv_error, rope_error)
