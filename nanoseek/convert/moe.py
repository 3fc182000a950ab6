"""Dense SwiGLU MLP -> DeepSeekMoE weights for one layer, in float64 on CPU.

* `split` (fine-grained experts, DeepSeekMoE arXiv 2401.06066; the neuron partition of MoEfication / LLaMA-MoE,
  Zhu et al. 2024): a sum of SwiGLUs over disjoint neurons is the wide SwiGLU, so with every expert active and
  unit combine weights the layer is the dense one exactly. The shared experts take the neurons that contribute
  most on average (DeepSeekMoE's common knowledge); the rest are grouped by co-activation so the router has
  something to choose between. The router fits each expert's output norm, scaled down until the sigmoid scores
  are nearly equal, so the normalised weights (times route_scale = top_k) stay ~1 for each pick.
* `upcycle` (sparse upcycling, Komatsuzaki et al. 2022, arXiv 2212.05055): every expert is a copy of the MLP.
  Top-k weights sum to route_scale, so with route_scale 1 and the shared and the routed experts each carrying
  1/(n_shared + 1) of the down-projection, the layer equals the dense one for any routing."""

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


def _balanced_kmeans(features: torch.Tensor, n_clusters: int, iters: int,
                     generator: torch.Generator) -> list[list[int]]:
    """Partition rows of features [n, N] (unit norm) into n_clusters groups of exactly n / n_clusters rows,
    by cosine similarity to the cluster means; greedy capacity-limited assignment each round."""
    n, size = features.shape[0], features.shape[0] // n_clusters
    centroids = features[torch.randperm(n, generator=generator)[:n_clusters]]
    groups: list[list[int]] = []
    for _ in range(iters):
        order = (features @ centroids.T).flatten().argsort(descending=True).tolist()  # over [n, C] similarities
        owner = [-1] * n
        groups = [[] for _ in range(n_clusters)]
        left = n
        for flat in order:
            row, cluster = divmod(flat, n_clusters)
            if owner[row] < 0 and len(groups[cluster]) < size:
                owner[row] = cluster
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
    m = w1.shape[0] // (n_shared + n_experts)
    act = F.silu(x @ w1.T) * (x @ w3.T)  # [N, I]: each neuron's activation a_n
    contribution = act.abs() * w2.norm(dim=0)  # [N, I]: size of each neuron's share of the output
    order = contribution.mean(0).argsort(descending=True)
    shared = order[:n_shared * m].sort().values
    routed = order[n_shared * m:].sort().values
    profile = contribution[:, routed].T  # co-activation profiles for balanced k-means
    profile = profile / profile.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    groups = [routed[g] for g in _balanced_kmeans(profile, n_experts, 20, torch.Generator().manual_seed(seed))]
    index = torch.stack(groups)  # [E, m]
    # Router: least squares of each expert's output norm on [x, 1].
    target = torch.stack([(act[:, g] @ w2[:, g].T).norm(dim=-1) for g in groups], dim=1)  # [N, E]
    gate = torch.zeros(n_experts, x.shape[1], dtype=x.dtype)
    if top_k < n_experts:  # with every expert active the choice is moot and a zero router is exact
        design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        gram = design.T @ design
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=x.dtype)
        coef = torch.linalg.solve(gram + ridge, design.T @ target)  # [dim+1, E]
        scale = router_std / (x @ coef[:-1]).std().clamp(min=1e-30)
        # The intercept is left out (balance_bias starts at 0): moving it into the selection bias barely
        # changed the KL in our checks and starved some experts of tokens.
        gate = (coef[:-1] * scale).T.contiguous()
    shared_w = (w1[shared], w2[:, shared], w3[shared]) if n_shared else (None, None, None)
    return MoEWeights(w1[index], w2[:, index].permute(1, 0, 2).contiguous(), w3[index], *shared_w, gate)


def upcycle_mlp(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, n_shared: int, n_experts: int,
                router_std: float, seed: int = 0) -> MoEWeights:
    """Sparse upcycling: every expert (moe_inter_dim = I) a copy; the router starts small and random.
    w1, w3: [I, dim], w2: [dim, I], x: [N, dim]."""
    w2 = w2 * (1.0 / (n_shared + 1))  # each copy carries an equal share of the output
    scale = router_std / x.pow(2).sum(-1).mean().sqrt().clamp(min=1e-30)
    gate = torch.randn(n_experts, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=x.dtype) * scale
    shared_w = (w1.repeat(n_shared, 1), w2.repeat(1, n_shared), w3.repeat(n_shared, 1)) if n_shared else (None,) * 3
    experts = (w.expand(n_experts, -1, -1).clone() for w in (w1, w2, w3))
    return MoEWeights(*experts, *shared_w, gate)
