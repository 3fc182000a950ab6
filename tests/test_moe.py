"""DeepSeekMoE: expert dispatch against a per-expert Python loop, router losses against hand-written
formulas, aux-loss-free balancing, group-limited routing, load counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import Experts, Gate, MoE


def moe_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=32, kv_lora_rank=8,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=32, n_dense_layers=1,
                n_routed_experts=6, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=8, mtp_depth=0)
    base.update(overrides)
    return ModelConfig(**base)


def init_moe(moe: MoE, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# ---- the slow, obvious reference -----------------------------------------------------------------


def reference_route(scores: torch.Tensor, bias: torch.Tensor, top_k: int) -> list[list[int]]:
    """Per token, the top_k experts by score + bias (Python sort, no topk kernel)."""
    chosen = []
    for row in (scores.detach() + bias).tolist():
        chosen.append(sorted(range(len(row)), key=lambda e: -row[e])[:top_k])
    return chosen


def swiglu(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One expert on one token: w2 (silu(w1 x) * w3 x); w1, w3 [inter, dim], w2 [dim, inter], x [dim]."""
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def reference_moe(x, gate_w, bias, w1, w2, w3, shared, top_k, score_func, route_scale):
    """A loop over tokens and their experts. x [N, dim] -> [N, dim]."""
    logits = x @ gate_w.T
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    rows = []
    for t, experts in enumerate(reference_route(scores, bias, top_k)):
        weights = scores[t, experts]
        if score_func == "sigmoid":
            weights = weights / weights.sum()
        weights = weights * route_scale
        out = sum(weights[j] * swiglu(w1[e], w2[e], w3[e], x[t]) for j, e in enumerate(experts))
        if shared is not None:
            out = out + swiglu(*shared, x[t])
        rows.append(out)
    return torch.stack(rows)


def track_paths(monkeypatch) -> list[str]:
    taken: list[str] = []
    grouped, batched = Experts._grouped, Experts._batched

    def spy_grouped(self, *args):
        taken.append("grouped")
        return grouped(self, *args)

    def spy_batched(self, *args):
        taken.append("batched")
        return batched(self, *args)

    monkeypatch.setattr(Experts, "_grouped", spy_grouped)
    monkeypatch.setattr(Experts, "_batched", spy_batched)
    return taken


# ---- dispatch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,inter,use_grouped_mm,path", [
    (16, 8, True, "grouped"),    # fp32 rows: 4-element alignment holds
    (16, 8, False, "batched"),   # forced off
    (16, 6, True, "batched"),    # inter_dim not 16-byte aligned -> fallback
    (10, 8, True, "batched"),    # dim not aligned -> fallback
])
@pytest.mark.parametrize("score_func,route_scale", [("sigmoid", 1.0), ("softmax", 2.5)])
def test_moe_matches_per_expert_loop(monkeypatch, dim, inter, use_grouped_mm, path, score_func, route_scale):
    cfg = moe_config(dim=dim, moe_inter_dim=inter, n_heads=2, score_func=score_func, route_scale=route_scale)
    moe = MoE(cfg)
    init_moe(moe)
    moe.experts.use_grouped_mm = use_grouped_mm
    with torch.no_grad():  # experts 1 and 4 never win: their groups are empty
        moe.gate.balance_bias.copy_(torch.tensor([0.0, -100.0, 0.1, 0.0, -100.0, -0.1]))
    taken = track_paths(monkeypatch)
    bsz, seq_len = 3, 8
    x = torch.randn(bsz, seq_len, dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = moe(x)
    assert taken == [path]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * grad_out).sum().backward()

    # float64 leaf copies for the reference
    leaves = {name: p.detach().double().requires_grad_() for name, p in moe.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    shared = tuple(leaves[f"shared_experts.{w}.weight"] for w in ("w1", "w2", "w3"))
    ref = reference_moe(x64.view(-1, dim), leaves["gate.weight"], moe.gate.balance_bias.double(),
                        leaves["experts.w1"], leaves["experts.w2"], leaves["experts.w3"], shared,
                        cfg.n_activated_experts, score_func, route_scale).view(bsz, seq_len, dim)
    (ref * grad_out.double()).sum().backward()

    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-5)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(p.grad.double(), leaves[name].grad, atol=2e-5, rtol=1e-5, msg=name)
    # unused experts: exactly zero gradient, and the router weight still learns through the others
    for w in ("w1", "w2", "w3"):
        grad = getattr(moe.experts, w).grad
        assert torch.all(grad[[1, 4]] == 0) and grad[[0, 2, 3, 5]].abs().sum() > 0
    assert moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_experts_direct_dispatch_with_empty_experts(use_grouped_mm):
    """Experts alone, with hand-made routing that leaves the first, a middle and the last expert empty."""
    cfg = moe_config(dim=16, moe_inter_dim=8, n_routed_experts=7)
    experts = Experts(cfg)
    experts.use_grouped_mm = use_grouped_mm
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    n_tokens = 9
    x = torch.randn(n_tokens, 16, generator=gen, requires_grad=True)
    indices = torch.tensor([[1, 2], [2, 1], [5, 2], [1, 5], [2, 5], [5, 1], [1, 2], [2, 5], [5, 1]])
    weights = torch.rand(n_tokens, 2, generator=gen, requires_grad=True)
    out = experts(x, weights, indices)
    out.sum().backward()  # zero-stride incoming gradient: the case torch._grouped_mm cannot take raw

    w1, w2, w3 = (getattr(experts, n).detach().double().requires_grad_() for n in ("w1", "w2", "w3"))
    x64, wt64 = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    ref = torch.stack([sum(wt64[t, j] * swiglu(w1[e], w2[e], w3[e], x64[t]) for j, e in enumerate(row))
                       for t, row in enumerate(indices.tolist())])
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.grad.double(), wt64.grad, atol=1e-5, rtol=1e-5)
    for name, ref_w in (("w1", w1), ("w2", w2), ("w3", w3)):
        grad = getattr(experts, name).grad
        torch.testing.assert_close(grad.double(), ref_w.grad, atol=1e-5, rtol=1e-5)
        assert torch.all(grad[[0, 3, 4, 6]] == 0)


def test_grouped_and_batched_agree_under_bf16_autocast(monkeypatch):
    cfg = moe_config(dim=16, moe_inter_dim=16)  # 8-element (16-byte) alignment for bf16
    moe = MoE(cfg)
    init_moe(moe)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    taken = track_paths(monkeypatch)
    outs = []
    for use_grouped_mm in (True, False):
        moe.experts.use_grouped_mm = use_grouped_mm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(moe(x).float())
    assert taken == ["grouped", "batched"]
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=2e-2)


def test_router_stays_fp32_under_autocast():
    """router_fp32: logits, scores and combine weights are computed in fp32 even inside a bf16 autocast
    region (DeepSeek-V3 and ST-MoE keep the router in full precision)."""
    cfg = moe_config(n_routed_experts=6, router_z_loss_coef=1e-3)
    gate = Gate(cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
    x = torch.randn(32, cfg.dim, generator=gen)
    gate.track_stats = True
    weights, indices, losses = gate(x, 4)
    stats = gate.logit_stats.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights_ac, indices_ac, losses_ac = gate(x, 4)
    assert weights_ac.dtype == torch.float32
    assert torch.equal(indices_ac, indices)
    torch.testing.assert_close(weights_ac, weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses_ac["z"], losses["z"], rtol=1e-6, atol=0)
    torch.testing.assert_close(gate.logit_stats, stats, rtol=1e-6, atol=0)


# ---- router losses -------------------------------------------------------------------------------


def test_sequence_aux_loss_and_z_loss_match_formulas():
    """DeepSeek-V3 (arXiv 2412.19437) eqs. 17-20 and ST-MoE's router z-loss, written as loops."""
    bsz, seq_len, n_exp, top_k, alpha, z_coef = 2, 5, 6, 2, 0.01, 0.001
    cfg = moe_config(n_routed_experts=n_exp, n_activated_experts=top_k, aux_loss_coef=alpha,
                     router_z_loss_coef=z_coef)
    gate = Gate(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
        gate.balance_bias.copy_(torch.randn(n_exp, generator=gen) * 0.1)
    x = torch.randn(bsz * seq_len, cfg.dim, generator=gen)
    _, _, losses = gate(x, bsz)

    logits = (x.double() @ gate.weight.detach().double().T).tolist()
    scores = [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
    chosen = reference_route(torch.tensor(scores), gate.balance_bias.double(), top_k)
    per_sequence = []
    for b in range(bsz):
        tokens = range(b * seq_len, (b + 1) * seq_len)
        balance = 0.0
        for i in range(n_exp):
            f_i = n_exp / (top_k * seq_len) * sum(i in chosen[t] for t in tokens)  # eq. 18
            p_i = sum(scores[t][i] / sum(scores[t]) for t in tokens) / seq_len  # eqs. 19-20
            balance += f_i * p_i
        per_sequence.append(alpha * balance)  # eq. 17
    expected_aux = sum(per_sequence) / bsz
    expected_z = z_coef * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)
    assert losses["aux"].item() == pytest.approx(expected_aux, rel=1e-5)
    assert losses["z"].item() == pytest.approx(expected_z, rel=1e-5)

    # a router with equal scores has P_i = 1/E, so sum_i f_i P_i = 1 whatever it picks: aux = alpha
    with torch.no_grad():
        gate.weight.zero_()
        gate.balance_bias.copy_(torch.arange(n_exp, dtype=torch.float) * 1e-3)  # deterministic ties
    _, _, losses = gate(x, bsz)
    assert losses["aux"].item() == pytest.approx(alpha, rel=1e-6)
    assert losses["z"].item() == pytest.approx(z_coef * math.log(n_exp) ** 2, rel=1e-6)


def test_router_losses_off_by_default():
    gate = Gate(moe_config())
    _, _, losses = gate(torch.randn(8, 16), 2)
    assert losses == {}


def test_router_losses_come_up_the_forward_summed_over_layers():
    """The output's aux / z are the sum of every MoE layer's own gate losses (MTP block included), with or
    without targets, and a second forward does not add the first one's."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=64, n_layers=3, n_dense_layers=1, mtp_depth=1,
                                  aux_loss_coef=0.01, router_z_loss_coef=1e-3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    per_gate: list[dict] = []
    handles = [moe.gate.register_forward_hook(lambda m, args, out: per_gate.append(out[2]))
               for _, moe in model.moe_layers()]
    idx, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 13))
    out = model(idx, targets)
    assert len(per_gate) == 3  # layers 1 and 2, and the MTP module's block
    for name in ("aux", "z"):
        torch.testing.assert_close(out.losses[name], sum(g[name] for g in per_gate), rtol=1e-6, atol=0)
    per_gate.clear()
    plain = model(idx)  # no targets: no MTP pass, the main layers' router losses only
    for handle in handles:
        handle.remove()
    assert len(per_gate) == 2 and plain.loss is None
    for name in ("aux", "z"):
        torch.testing.assert_close(plain.losses[name], sum(g[name] for g in per_gate), rtol=1e-6, atol=0)


# ---- auxiliary-loss-free balancing ---------------------------------------------------------------


def test_update_balance_bias_step_by_hand():
    gate = Gate(moe_config(n_routed_experts=4, balance_rate=0.5))
    gate.load.copy_(torch.tensor([4.0, 0.0, 2.0, 2.0]))  # mean 2
    gate.update_balance_bias()
    torch.testing.assert_close(gate.balance_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(gate.last_load, torch.tensor([4.0, 0.0, 2.0, 2.0]) / 8 * 2)
    assert torch.all(gate.load == 0)
    gate.update_balance_bias()  # nothing counted: the bias must not move
    torch.testing.assert_close(gate.balance_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))


def test_balance_bias_evens_out_a_skewed_router():
    n_exp, top_k, dim = 7, 2, 16
    gate = Gate(moe_config(dim=dim, n_routed_experts=n_exp, n_activated_experts=top_k, balance_rate=0.01))
    gen = torch.Generator().manual_seed(1)
    hidden_mean = torch.randn(dim, generator=gen)
    hidden_mean = hidden_mean / hidden_mean.norm() * 2.0  # hidden states share a mean direction
    with torch.no_grad():
        weight = torch.randn(n_exp, dim, generator=gen) * 0.5
        weight[:2] += hidden_mean  # experts 0 and 1 score ~sigmoid(4) on a typical token
        gate.weight.copy_(weight)
    gate.weight.requires_grad_(False)
    gate.train()
    mean_load = top_k / n_exp
    loads = []
    with torch.no_grad():
        for step in range(300):
            if step == 200:  # fast approach, then DeepSeek-V3's gamma = 0.001 to settle the sign-update jitter
                gate.balance_rate = 0.001
            gate(torch.randn(2048, dim, generator=gen) + hidden_mean, 4)
            gate.update_balance_bias()
            loads.append(gate.last_load.clone())
    first, last = loads[0], loads[-1]
    assert first[:2].min() > 0.6 and (first - mean_load).abs().max() > 0.4  # far from balanced
    assert (last - mean_load).abs().max() < 0.08, last
    settled = torch.stack(loads[-20:]).mean(0)
    assert (settled - mean_load).abs().max() < 0.04, settled
    torch.testing.assert_close(last.sum(), torch.tensor(float(top_k)))
    assert gate.balance_bias[:2].max() < gate.balance_bias[2:].min()  # the favourites were pushed down
    torch.testing.assert_close(gate.weight, weight)  # the router itself never moved


# ---- group-limited routing -----------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_group_limited_routing_matches_reference(score_func):
    n_exp, n_groups, n_limited, top_k = 12, 4, 2, 3
    cfg = moe_config(n_routed_experts=n_exp, n_expert_groups=n_groups, n_limited_groups=n_limited,
                     n_activated_experts=top_k, score_func=score_func)
    gate = Gate(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
        gate.balance_bias.copy_(torch.randn(n_exp, generator=gen) * 0.05)
    x = torch.randn(64, cfg.dim, generator=gen)
    _, indices, _ = gate(x, 4)

    logits = x.double() @ gate.weight.detach().double().T
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    choice = (scores + gate.balance_bias.double()).tolist()
    per_group = n_exp // n_groups
    differs_from_ungrouped = 0
    for t, row in enumerate(choice):
        groups = [row[g * per_group:(g + 1) * per_group] for g in range(n_groups)]
        if score_func == "sigmoid":  # DeepSeek-V3: a group scores the sum of its two best experts
            group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        else:  # DeepSeek-V2: its best expert
            group_score = [max(g) for g in groups]
        kept = sorted(range(n_groups), key=lambda g: -group_score[g])[:n_limited]
        candidates = [e for e in range(n_exp) if e // per_group in kept]
        expected = sorted(candidates, key=lambda e: -row[e])[:top_k]
        assert sorted(indices[t].tolist()) == sorted(expected), t
        assert {e // per_group for e in indices[t].tolist()} <= set(kept)
        differs_from_ungrouped += sorted(expected) != sorted(sorted(range(n_exp), key=lambda e: -row[e])[:top_k])
    assert differs_from_ungrouped > 0  # the limit actually changed some choices


# ---- load counting -------------------------------------------------------------------------------


def gate_loads(model: Transformer) -> list[torch.Tensor]:
    return [moe.gate.load.clone() for _, moe in model.moe_layers()]


def test_loads_not_double_counted_under_activation_checkpointing():
    cfg = moe_config(n_layers=3, mtp_depth=1)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    bsz, seq_len = 2, 12
    idx = torch.randint(0, cfg.vocab_size, (bsz, seq_len), generator=torch.Generator().manual_seed(8))
    targets = torch.randint(0, cfg.vocab_size, (bsz, seq_len + 1), generator=torch.Generator().manual_seed(9))

    model(idx, targets).loss.backward()
    plain = gate_loads(model)
    model.reset_expert_loads()
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx, targets).loss.backward()
    checkpointed = gate_loads(model)

    assert len(plain) == 3  # layers 1, 2 and the MTP block
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
        assert a.sum().item() == bsz * seq_len * cfg.n_activated_experts  # each token counted once


def test_reset_expert_loads_zeroes_only_the_loads():
    model = Transformer(moe_config(n_layers=3)).train()
    for _, moe in model.moe_layers():
        moe.gate.balance_bias.fill_(0.25)
        moe.gate.last_load.fill_(0.5)
    model(torch.randint(0, 64, (2, 8)))
    assert all(load.sum() > 0 for load in gate_loads(model))
    model.reset_expert_loads()
    for _, moe in model.moe_layers():
        assert torch.all(moe.gate.load == 0)
        assert torch.all(moe.gate.balance_bias == 0.25) and torch.all(moe.gate.last_load == 0.5)


def test_eval_mode_does_not_count_loads():
    model = Transformer(moe_config()).eval()
    model(torch.randint(0, 64, (2, 8)))
    assert all(load.sum() == 0 for load in gate_loads(model))
