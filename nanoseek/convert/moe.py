"""Dense SwiGLU MLP -> DeepSeekMoE weights for one layer (used by `convert.py`).

Two ways (x is the MLP input, a_n(x) = silu(w1_n x) * (w3_n x) neuron n's activation):

* `split` (fine-grained experts, DeepSeekMoE arXiv 2401.06066; the neuron partition of MoEfication /
  LLaMA-MoE, Zhu et al. 2024): the inter_dim neurons are partitioned into n_shared + n_routed blocks of
  moe_inter_dim. A sum of SwiGLUs over disjoint neurons is the wide SwiGLU, so with every expert active
  and unit combine weights the layer is the dense one exactly. The shared experts take the neurons that
  contribute most on average (always on, as DeepSeekMoE's shared experts hold common knowledge); the rest
  are grouped by co-activation (balanced k-means on |a_n| w2-norm profiles over calibration tokens), so the
  router has something to choose between. The router is a least-squares fit of each expert's output norm,
  scaled down until the sigmoid scores are nearly equal: top-k picks the experts that matter most for the
  token, and the normalised weights (times route_scale = top_k) stay ~1 for each pick.
* `upcycle` (sparse upcycling, Komatsuzaki et al. 2022, arXiv 2212.05055): every expert is a copy of the
  MLP. nanoseek's top-k weights sum to route_scale, so with route_scale 1 and the shared experts and the
  routed ones each carrying 1/(n_shared + 1) of the down-projection, the layer equals the dense one for any
  routing. The router starts small and random.

All arithmetic is float64 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MoEWeights:
    """One MoE layer's tensors, shaped as nanoseek's MoE (float64); shared_* is None with no shared expert."""

    w1: torch.Tensor  # [E, m, dim]
    w2: torch.Tensor  # [E, dim, m]
    w3: torch.Tensor  # [E, m, dim]
    shared_w1: torch.Tensor | None  # [S*m, dim]
    shared_w2: torch.Tensor | None  # [dim, S*m]
    shared_w3: torch.Tensor | None  # [S*m, dim]
    gate: torch.Tensor  # [E, dim]
    balance_bias: torch.Tensor  # [E]


def _balanced_kmeans(features: torch.Tensor, n_clusters: int, iters: int,
                     generator: torch.Generator) -> list[list[int]]:
    """Partition rows of features [n, N] (unit norm) into n_clusters groups of exactly n / n_clusters rows,
    by cosine similarity to the cluster means; greedy capacity-limited assignment each round."""
    n = features.shape[0]
    size = n // n_clusters
    centroids = features[torch.randperm(n, generator=generator)[:n_clusters]]
    groups: list[list[int]] = []
    for _ in range(iters):
        sim = features @ centroids.T  # [n, C]
        order = sim.flatten().argsort(descending=True).tolist()
        owner = [-1] * n
        fill = [0] * n_clusters
        groups = [[] for _ in range(n_clusters)]
        left = n
        for flat in order:
            row, cluster = divmod(flat, n_clusters)
            if owner[row] < 0 and fill[cluster] < size:
                owner[row] = cluster
                fill[cluster] += 1
                groups[cluster].append(row)
                left -= 1
                if left == 0:
                    break
        member = torch.zeros(n_clusters, n, dtype=features.dtype)
        member[torch.tensor(owner), torch.arange(n)] = 1.0
        new = member @ features  # [C, N]: cluster sums (equal sizes, so the direction of the mean)
        new = new / new.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return [sorted(g) for g in groups]


def split_mlp(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, n_shared: int, n_experts: int,
              top_k: int, router_std: float, seed: int = 0) -> MoEWeights:
    """Fine-grained split. w1, w3: [I, dim], w2: [dim, I], x: [N, dim] calibration MLP inputs; I must be a
    multiple of n_shared + n_experts (moe_inter_dim m = I / (n_shared + n_experts))."""
    inter = w1.shape[0]
    m = inter // (n_shared + n_experts)
    act = F.silu(x @ w1.T) * (x @ w3.T)  # [N, I]
    contribution = act.abs() * w2.norm(dim=0)  # [N, I]: size of each neuron's share of the output
    importance = contribution.mean(0)
    order = importance.argsort(descending=True)
    shared = order[:n_shared * m].sort().values
    routed = order[n_shared * m:].sort().values
    generator = torch.Generator().manual_seed(seed)
    profile = contribution[:, routed].T
    profile = profile / profile.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    groups = [routed[g] for g in _balanced_kmeans(profile, n_experts, 20, generator)]
    index = torch.stack(groups)  # [E, m]
    # Router: least squares of each expert's output norm on [x, 1].
    target = torch.stack([(act[:, g] @ w2[:, g].T).norm(dim=-1) for g in groups], dim=1)  # [N, E]
    gate = torch.zeros(n_experts, x.shape[1], dtype=x.dtype)
    bias = torch.zeros(n_experts, dtype=x.dtype)
    if top_k < n_experts:  # with every expert active the choice is moot and a zero router is exact
        design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        gram = design.T @ design
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=x.dtype)
        coef = torch.linalg.solve(gram + ridge, design.T @ target)  # [dim+1, E]
        spread = (x @ coef[:-1]).std().clamp(min=1e-30)
        scale = router_std / spread
        # The intercept is left out (balance_bias starts at 0): moving it into the selection bias barely
        # changed the KL in our checks and starved some experts of tokens.
        gate = (coef[:-1] * scale).T.contiguous()
    shared_w = (w1[shared], w2[:, shared], w3[shared]) if n_shared else (None, None, None)
    return MoEWeights(w1[index], w2[:, index].permute(1, 0, 2).contiguous(), w3[index], *shared_w, gate, bias)


def upcycle_mlp(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, n_shared: int, n_experts: int,
                router_std: float, seed: int = 0) -> MoEWeights:
    """Sparse upcycling: every expert (moe_inter_dim = I) a copy. w1, w3: [I, dim], w2: [dim, I], x: [N, dim]."""
    share = 1.0 / (n_shared + 1)
    generator = torch.Generator().manual_seed(seed)
    scale = router_std / x.pow(2).sum(-1).mean().sqrt().clamp(min=1e-30)
    gate = torch.randn(n_experts, x.shape[1], generator=generator, dtype=x.dtype) * scale
    shared_w = (None, None, None)
    if n_shared:
        shared_w = (w1.repeat(n_shared, 1), (w2 * share).repeat(1, n_shared), w3.repeat(n_shared, 1))
    return MoEWeights(w1.expand(n_experts, -1, -1).clone(), (w2 * share).expand(n_experts, -1, -1).clone(),
                      w3.expand(n_experts, -1, -1).clone(), *shared_w, gate, torch.zeros(n_experts, dtype=x.dtype))
