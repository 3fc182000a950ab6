"""Optimizers, parameter groups and LR schedules (nanoseek/train/optim.py)."""

import copy
import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from nanoseek.config import TrainConfig
from nanoseek.train.optim import (Lion, Muon, apply_lr_factor, build_optimizer, lr_factor, newton_schulz,
                                  param_groups)


class NormLike(nn.Module):
    """An RMSNorm-shaped module: one 1-D gain."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Toy(nn.Module):
    """embed -> norm -> proj (with bias) -> stacked experts [E, out, in] -> norm -> head."""

    def __init__(self, vocab: int = 40, dim: int = 16, n_experts: int = 3, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn_norm = NormLike(dim)
        self.proj = nn.Linear(dim, dim)
        self.experts = nn.Parameter(torch.randn(n_experts, dim, dim) * 0.1)
        self.norm = NormLike(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        x = self.proj(self.attn_norm(self.embed(idx)))
        x = x + torch.einsum("btd,eod->bto", x, self.experts) / self.experts.size(0)
        return self.head(self.norm(x))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def _groups_by_name(model, cfg):
    return {g["name"]: _names(model, g) for g in build_optimizer(model, cfg).param_groups}


def _loss(model, seed=0):
    idx = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(seed))
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


# ---- parameter groups -------------------------------------------------------------------------


def test_adamw_decays_matrices_only():
    groups = _groups_by_name(Toy(), TrainConfig(optimizer="adamw"))
    assert groups["decay"] == ["experts", "head.weight", "proj.weight"]
    assert groups["no_decay"] == ["attn_norm.weight", "embed.weight", "norm.weight", "proj.bias"]


def test_tied_head_is_an_embedding_and_appears_once():
    model = Toy(tie=True)
    opt = build_optimizer(model, TrainConfig(optimizer="adamw"))
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    groups = {g["name"]: _names(model, g) for g in opt.param_groups}
    assert "embed.weight" in groups["no_decay"] and groups["decay"] == ["experts", "proj.weight"]


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05)
    model = Toy()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    groups = {g["name"]: g for g in opt.param_groups}
    assert _names(model, groups["muon"]) == ["experts", "proj.weight"]
    assert _names(model, groups["decay"]) == ["head.weight"]
    assert _names(model, groups["no_decay"]) == ["attn_norm.weight", "embed.weight", "norm.weight", "proj.bias"]
    assert groups["muon"]["base_lr"] == 0.05 and groups["muon"]["use_muon"]
    assert groups["decay"]["base_lr"] == groups["no_decay"]["base_lr"] == 1e-3
    assert not groups["decay"]["use_muon"] and groups["no_decay"]["weight_decay"] == 0.0


def test_frozen_params_are_left_out():
    model = Toy()
    model.embed.weight.requires_grad_(False)
    names = [n for g in param_groups(model, TrainConfig()) for n in _names(model, g)]
    assert "embed.weight" not in names and len(names) == 6


def test_every_group_has_base_lr_and_apply_lr_factor_scales_it():
    for name in ("adamw", "lion", "muon"):
        opt = build_optimizer(Toy(), TrainConfig(optimizer=name))
        apply_lr_factor(opt, 0.25)
        for group in opt.param_groups:
            assert group["lr"] == group["base_lr"] * 0.25


# ---- update rules against references ----------------------------------------------------------


def test_newton_schulz_singular_values_near_one_and_directions_of_svd():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (48, 48)]:
        grad = torch.randn(*shape)
        out = newton_schulz(grad)
        singular = torch.linalg.svdvals(out)
        # Jordan et al. 2024: the quintic lands singular values in about [0.7, 1.2], not exactly 1.
        assert singular.min() > 0.6 and singular.max() < 1.25, (shape, singular.min(), singular.max())
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        polar = u @ vh  # the exact orthogonalisation
        cosine = (out * polar).sum() / (out.norm() * polar.norm())
        assert cosine > 0.97


def test_newton_schulz_treats_leading_dims_as_a_batch():
    grads = torch.randn(3, 24, 40)
    stacked = newton_schulz(grads)
    one_by_one = torch.stack([newton_schulz(g) for g in grads])
    torch.testing.assert_close(stacked, one_by_one)


def test_lion_first_step_is_lr_times_sign():
    p = nn.Parameter(torch.randn(5, 3))
    start = p.detach().clone()
    p.grad = torch.randn(5, 3)
    opt = Lion([p], lr=0.01, betas=(0.9, 0.99), weight_decay=0.5)
    opt.step()
    expected = start * (1 - 0.01 * 0.5) - 0.01 * p.grad.sign()
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * p.grad)


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_muon_step_equals_the_update_written_per_matrix(fast_bf16, monkeypatch):
    """Muon batches same-shape matrices into one Newton-Schulz call where bf16 is fast (here: pretend the
    CPU has AMX or not); either way the result is the per-matrix rule:
    m <- lerp(m, g, 1 - mu); p <- p (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(lerp(g, m, mu))."""
    monkeypatch.setattr("nanoseek.train.optim.cpu_has_amx", lambda: fast_bf16)
    torch.manual_seed(0)
    shapes = [(8, 5), (8, 5), (5, 8), (3, 2, 4), (8, 5)]
    params = [nn.Parameter(torch.randn(*s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    lr, wd, mu = 0.02, 0.1, 0.95
    opt = Muon([dict(params=params, use_muon=True)], lr=lr, weight_decay=wd, momentum=mu)
    expected, buffers = [w.clone() for w in start], [torch.zeros_like(w) for w in start]
    for _ in range(3):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            buffers[i].lerp_(g, 1 - mu)
            update = newton_schulz(g.lerp(buffers[i], mu))
            scale = math.sqrt(max(1.0, g.size(-2) / g.size(-1)))
            expected[i] = expected[i] * (1 - lr * wd) - lr * scale * update
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_newton_schulz_batches_group_by_shape_within_the_element_cap(monkeypatch):
    from nanoseek.train import optim

    params = [torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(2, 8), torch.zeros(4, 4), torch.zeros(4, 4)]
    monkeypatch.setattr(optim, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(optim, "NS_BATCH_ELEMENTS", 48)  # three 4x4 matrices per call at most
    shapes = [[tuple(p.shape) for p in batch] for batch in optim._newton_schulz_batches(params)]
    assert shapes == [[(4, 4)] * 3, [(2, 8)], [(4, 4)]]
    monkeypatch.setattr(optim, "cpu_has_amx", lambda: False)  # fp32 on CPU: one matrix per call
    assert [len(b) for b in optim._newton_schulz_batches(params)] == [1] * 5


def test_muon_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    p_ours = nn.Parameter(torch.randn(6, 4))
    p_ref = nn.Parameter(p_ours.detach().clone())
    ours = Muon([dict(params=[p_ours], use_muon=False, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)])
    ref = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(6, 4)
        p_ours.grad, p_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p_ours.detach(), p_ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,lr", [("lion", 3e-3), ("muon", 0.02), ("adamw", 1e-2)])
def test_optimizer_reduces_toy_regression(name, lr):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = x @ torch.randn(16, 8)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 8))
    opt = build_optimizer(model, TrainConfig(optimizer=name, lr=lr, muon_lr=lr, weight_decay=0.0))
    first = None
    for _ in range(150):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first, (name, first, loss.item())


@pytest.mark.parametrize("name", ["adamw", "lion", "muon"])
def test_params_without_grad_are_untouched(name):
    model = Toy()
    opt = build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.1))
    untouched = model.experts.detach().clone()
    loss = model.head(model.proj(model.embed(torch.tensor([[1, 2, 3]])))).sum()  # experts get no grad
    loss.backward()
    assert model.experts.grad is None
    opt.step()
    assert torch.equal(model.experts, untouched)
    assert not torch.equal(model.proj.weight, Toy().proj.weight)


@pytest.mark.parametrize("name", ["adamw", "lion", "muon"])
def test_state_dict_round_trip_gives_identical_next_steps(name):
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer=name)
    model = Toy()
    opt = build_optimizer(model, cfg)
    for step in range(3):
        apply_lr_factor(opt, lr_factor(step, cfg))
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    # Through bytes, as a checkpoint would, with the strict loader.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, cfg)
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        for m, o in ((model, opt), (resumed_model, resumed)):
            apply_lr_factor(o, lr_factor(step, cfg))
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_no_trainable_params_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


# ---- schedules --------------------------------------------------------------------------------


def _cfg(**kw):
    return TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, **kw)


def test_warmup_starts_above_zero_and_ends_at_one():
    for schedule in ("cosine", "wsd", "constant", "cyclic"):
        cfg = _cfg(schedule=schedule)
        assert lr_factor(0, cfg) == pytest.approx(0.1)
        assert lr_factor(4, cfg) == pytest.approx(0.5)
        assert lr_factor(9, cfg) == pytest.approx(1.0)
        assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(0, TrainConfig(warmup_steps=0)) == 1.0


def test_cosine_reaches_min_ratio_at_max_steps():
    cfg = _cfg(schedule="cosine")
    assert lr_factor(55, cfg) == pytest.approx(0.55)  # halfway: the mean of 1 and 0.1
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_plateau_then_linear_decay():
    cfg = _cfg(schedule="wsd", decay_fraction=0.2)
    assert all(lr_factor(s, cfg) == 1.0 for s in range(10, 80))
    assert lr_factor(90, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_constant_after_warmup():
    cfg = _cfg(schedule="constant")
    assert all(lr_factor(s, cfg) == 1.0 for s in range(10, 200))


def test_cyclic_is_periodic_between_min_and_one():
    cfg = _cfg(schedule="cyclic", cycle_steps=20)
    assert lr_factor(20, cfg) == pytest.approx(0.1)  # mid-cycle
    assert lr_factor(30, cfg) == pytest.approx(1.0)  # cycle end
    for s in range(10, 60):
        assert lr_factor(s, cfg) == pytest.approx(lr_factor(s + 20, cfg))
        assert 0.1 - 1e-12 <= lr_factor(s, cfg) <= 1.0


def test_lr_factor_is_pure():
    for schedule in ("cosine", "wsd", "constant", "cyclic"):
        cfg = _cfg(schedule=schedule)
        before = dataclasses.asdict(cfg)
        first = [lr_factor(s, cfg) for s in range(0, 120, 7)]
        again = [lr_factor(s, cfg) for s in reversed(range(0, 120, 7))][::-1]
        assert first == again and dataclasses.asdict(cfg) == before
        assert all(math.isfinite(v) and v > 0 for v in first)
