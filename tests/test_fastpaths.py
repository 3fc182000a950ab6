"""Fast paths compute what the simple paths compute: chunked cross-entropy vs full logits, grouped-mm
MoE dispatch vs a per-expert loop (forward and backward), RMSNorm's hand-written backward vs autograd,
fp32 attention under CPU bf16 training vs float64 attention, no graph breaks under torch.compile, and the
`--hardware auto` precision choice on made-up devices."""

from __future__ import annotations

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.attention import CPU_FP32_ATTENTION_MAX_LEN, attend
from nanoseek.model.layers import RMSNorm
from nanoseek.model.moe import Experts, expert_counts, per_expert_loop
from nanoseek.model.transformer import IGNORE_INDEX, chunked_cross_entropy
from nanoseek.train.hardware import HardwareChoice, choose_precision, cpu_has_amx
from tiny import tiny_model_config


def small_config(**overrides) -> ModelConfig:
    return tiny_model_config(**{"vocab_size": 97, **overrides})


def loss_and_grads(model: Transformer, idx, targets, loss_chunk: int):
    model.zero_grad(set_to_none=True)
    model.loss_chunk = loss_chunk
    out = model(idx, targets)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# ---- RMSNorm's closed-form backward and CPU attention upcast ------------------------------------


def rms_norm_by_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The obvious RMSNorm, differentiated by autograd (the reference for the hand-written backward)."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_rms_norm_backward_passes_gradcheck_in_float64():
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13), (torch.bfloat16, 1e-2)])
def test_rms_norm_fast_path_matches_autograd(dtype, tol):
    torch.manual_seed(0)
    norm = RMSNorm(48).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(5, 7, 48)).to(dtype).requires_grad_()
    grad_out = torch.randn(5, 7, 48).to(dtype)
    fast = norm(x)
    gx_fast, gw_fast = torch.autograd.grad(fast, (x, norm.weight), grad_out)
    ref = rms_norm_by_autograd(x, norm.weight, norm.eps)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, norm.weight), grad_out)
    assert fast.dtype == ref.dtype == dtype and gx_fast.dtype == dtype and gw_fast.dtype == dtype
    for a, b in ((fast, ref), (gx_fast, gx_ref), (gw_fast, gw_ref)):
        scale = b.double().abs().max().item()
        assert (a.double() - b.double()).abs().max().item() <= tol * scale
    with torch.no_grad():  # the inference path (no autograd.Function) gives the same forward
        torch.testing.assert_close(norm(x), fast.detach(), rtol=tol, atol=tol)


def test_rms_norm_keeps_float64_statistics():
    """A float64 reference model must not round its norms through fp32."""
    x = torch.randn(4, 16, dtype=torch.float64) * 1e3
    norm = RMSNorm(16).double()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    with torch.no_grad():
        assert (norm(x) - expected).abs().max().item() < 1e-13
    assert (norm(x.requires_grad_()) - expected).abs().max().item() < 1e-13


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_bf16_training_attends_in_fp32(masked, monkeypatch):
    """Under CPU bf16 training, short sequences attend in fp32 (a faster kernel there): SDPA sees fp32
    inputs, the output and gradients come back in bf16 and equal float64 attention to bf16 rounding."""
    torch.manual_seed(0)
    seq = 16
    assert seq <= CPU_FP32_ATTENTION_MAX_LEN
    q, k, v = (torch.randn(2, 3, seq, 8).bfloat16() for _ in range(3))
    key_mask = torch.ones(2, seq, dtype=torch.long)
    key_mask[0, :5] = 0  # left padding: rows with no visible key come out as zeros on both paths
    mask = key_mask if masked else None
    grad_out = torch.randn(2, 3, seq, 8).bfloat16()
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(*leaves, scale=8 ** -0.5, key_mask=mask)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert seen == [torch.float32]
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)

    reference = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref = attend(*reference, scale=8 ** -0.5, key_mask=mask)
    grads_ref = torch.autograd.grad(out_ref, reference, grad_out.double())
    torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=1e-2)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=2e-2)
    with torch.no_grad():  # inference keeps bf16 attention
        seen.clear()
        attend(q, k, v, scale=8 ** -0.5, key_mask=mask)
        assert seen == [torch.bfloat16]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_bf16_model_trains_on_cpu_without_autocast(attention):
    """A model cast to bf16 (no autocast) trains on CPU: the fp32 attention path hands bf16 back to wo."""
    torch.manual_seed(0)
    model = Transformer(small_config(attention=attention, n_kv_heads=1 if attention == "gqa" else None,
                                     n_routed_experts=0, mtp_depth=0)).to(torch.bfloat16).train()
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


# ---- chunked cross-entropy -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(),                                                   # MLA + MoE + one MTP module
    dict(mtp_kind="shared", mtp_depth=2, n_routed_experts=0),  # seed 004's shared-head MTP
    dict(logit_z_loss_coef=1e-2, tie_embeddings=True, mtp_depth=0),
])
@pytest.mark.parametrize("chunk", [7, 64, 1000])  # ragged last chunk, even chunks, one chunk
def test_chunked_ce_matches_full_logits(overrides, chunk):
    torch.manual_seed(0)
    model = Transformer(small_config(**overrides)).double().train()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (3, 16), generator=gen)
    targets = torch.randint(0, 97, (3, 16 + model.config.mtp_depth), generator=gen)
    targets[0, :5] = IGNORE_INDEX  # padding positions are not scored on either path
    plain, plain_grads = loss_and_grads(model, idx, targets, loss_chunk=0)
    chunked, chunked_grads = loss_and_grads(model, idx, targets, loss_chunk=chunk)
    assert chunked.logits is None
    assert set(chunked.losses) == set(plain.losses)
    for name in plain.losses:
        torch.testing.assert_close(chunked.losses[name], plain.losses[name], rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-12, atol=1e-12)
    assert set(chunked_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_ce_function_against_f_cross_entropy_and_logit_max():
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 50, bias=False).double()
    hidden = torch.randn(2, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=gen)
    targets[1, -3:] = IGNORE_INDEX
    ce, lse_sq, peak = chunked_cross_entropy(head, hidden, targets, chunk=4, logsumexp_sq=True, logit_max=True)
    logits = head(hidden)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(lse_sq, logits.logsumexp(-1).pow(2).mean())
    torch.testing.assert_close(peak, logits.abs().max().detach())
    (g_chunk,) = torch.autograd.grad(ce + lse_sq, hidden)
    (g_ref,) = torch.autograd.grad(ref + logits.logsumexp(-1).pow(2).mean(), hidden)
    torch.testing.assert_close(g_chunk, g_ref)


def test_chunked_ce_under_bf16_autocast_is_close_to_plain():
    torch.manual_seed(0)
    model = Transformer(small_config(dim=64, moe_inter_dim=16, mtp_depth=0)).train()
    idx = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, idx, idx, loss_chunk=0)
        chunked, chunked_grads = loss_and_grads(model, idx, idx, loss_chunk=5)
    # The same bf16 head matmul row by row, so the loss agrees to fp32 summation order. The head's weight
    # gradient is a bf16 matmul per chunk, each rounded to bf16 before the chunks are summed: bf16-level
    # agreement (8 mantissa bits: ~0.4% per element), checked as a relative norm.
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        assert (chunked_grads[name] - grad).norm() <= 1e-2 * grad.norm() + 1e-8, name


# ---- MoE dispatch: grouped matmul vs a per-expert loop -------------------------------------------


# float64 always takes the batched path (torch._grouped_mm has no float64 kernel): it checks that path tightly.
@pytest.mark.parametrize("dtype,use_grouped_mm", [(torch.float32, True), (torch.float32, False), (torch.float64, False)])
def test_grouped_dispatch_matches_per_expert_loop(dtype, use_grouped_mm):
    cfg = small_config(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2)
    experts = Experts(cfg).to(dtype)
    experts.use_grouped_mm = use_grouped_mm
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    n = 40
    x = torch.randn(n, 32, generator=gen, dtype=dtype)
    # Random distinct top-2 per token, with expert 3 never chosen (an empty group).
    choices = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    indices = torch.stack([choices[torch.randperm(7, generator=gen)[:2]] for _ in range(n)])
    weights = torch.rand(n, 2, generator=gen, dtype=dtype)
    grad_out = torch.randn(n, 32, generator=gen, dtype=dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weights)]
        experts.zero_grad(set_to_none=True)
        out = fn(experts, leaves[0], leaves[1], indices)
        (out * grad_out).sum().backward()
        return out.detach(), [t.grad for t in leaves] + [getattr(experts, w).grad.clone() for w in ("w1", "w2", "w3")]

    fast, fast_grads = run(lambda e, *args: e(*args))
    ref, ref_grads = run(per_expert_loop)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, ref, **tol)
    for got, want, name in zip(fast_grads, ref_grads, ("x", "weights", "w1", "w2", "w3")):
        torch.testing.assert_close(got, want, **tol, msg=name)
    assert torch.all(experts.w1.grad[3] == 0)


def test_expert_counts_match_bincount():
    flat = torch.tensor([3, 0, 3, 5, 5, 5, 0])
    torch.testing.assert_close(expert_counts(flat, 7), torch.bincount(flat, minlength=7))


@pytest.mark.slow
def test_moe_and_mtp_compile_without_graph_breaks():
    """torch._dynamo.explain traces the whole training forward (MLA, MoE, MTP, loss) as one graph."""
    torch.manual_seed(0)
    model = Transformer(small_config()).train()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 17))
    for loss_chunk in (0, 8):
        model.loss_chunk = loss_chunk
        for autocast in (False, True):  # fp32 takes the batched expert path, bf16 torch._grouped_mm
            torch._dynamo.reset()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                explanation = torch._dynamo.explain(lambda i, t: model(i, t).loss)(idx, targets)
            reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
            assert explanation.graph_break_count == 0, (loss_chunk, autocast, reasons)
            assert explanation.graph_count == 1


def test_compiled_training_steps_trace_once():
    """Repeated training steps compile one graph: nothing the forward touches (RoPE's tables) changes
    between steps. The rotation tables keep their dtypes through model.to(dtype)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = Transformer(small_config(attention="gqa", n_kv_heads=1, n_routed_experts=0, mtp_depth=0)).train()
    rotary = model.layers[0].attn.rotary
    kinds = {dtype: t.dtype for dtype, t in rotary.tables.items()}
    assert set(kinds) == {torch.float32, torch.float64, torch.complex64, torch.complex128}
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for autocast in (False, False, True, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = compiled(idx, targets).loss
        loss.backward()
    assert counter.frame_count == 2  # one graph per precision, none recompiled
    model.to(torch.float64)
    assert {dtype: t.dtype for dtype, t in rotary.tables.items()} == kinds
    torch._dynamo.reset()


# ---- --hardware auto ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,capability,torchao,precision,fp8,amx", [
    (None, None, True, "fp32", False, False),
    (None, None, False, "bf16", False, True),  # a CPU with AMX
    ("NVIDIA H100 80GB HBM3", (9, 0), True, "bf16", True, False),
    ("NVIDIA H100 80GB HBM3", (9, 0), False, "bf16", False, False),
    ("NVIDIA H200", (9, 0), True, "bf16", True, False),
    ("NVIDIA A100-SXM4-80GB", (8, 0), True, "bf16", False, False),
    ("NVIDIA GeForce RTX 4090", (8, 9), True, "bf16", False, False),
    ("Tesla V100-SXM2-16GB", (7, 0), True, "fp16", False, False),
    ("Tesla T4", (7, 5), False, "fp16", False, False),
])
def test_hardware_choice(name, capability, torchao, precision, fp8, amx):
    choice = choose_precision(name, capability, torchao, cpu_amx=amx)
    assert isinstance(choice, HardwareChoice)
    assert (choice.precision, choice.fp8) == (precision, fp8)
    assert choice.reason and "\n" not in choice.reason
    if name is not None:
        assert name in choice.reason
    if name and "H100" in name and not torchao:
        assert "torchao" in choice.reason  # says what would turn fp8 on


def test_hardware_auto_on_this_machine_sets_a_valid_train_config():
    from nanoseek.config import RunConfig
    from nanoseek.train.hardware import apply_hardware

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, choice = apply_hardware(RunConfig(), device)
    assert cfg.train.precision == choice.precision and cfg.train.fp8 == choice.fp8
    if device.type == "cpu":
        assert choice.precision == ("bf16" if cpu_has_amx() else "fp32")


# ---- GPU-only checks ----------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_grouped_dispatch_on_cuda_matches_loop_without_host_sync():
    cfg = small_config(dim=64, moe_inter_dim=32, n_routed_experts=8)
    experts = Experts(cfg).cuda()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    x = torch.randn(256, 64, device="cuda")
    weights, indices = torch.rand(256, 8, device="cuda").topk(2, dim=-1)
    # Before Hopper torch's grouped_mm itself falls back to a loop with a host sync (pytorch #186620).
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = per_expert_loop(experts, x, weights, indices)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if hopper else "default")  # a device-to-host sync raises
        try:
            fast = experts(x, weights, indices)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_fp8_on_hopper_keeps_mla_router_and_head_high_precision():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    pytest.importorskip("torchao")
    from nanoseek.train.fp8 import HIGH_PRECISION, enable_fp8

    model = Transformer(ModelConfig.from_preset("tiny", dim=128, moe_inter_dim=128, inter_dim=256)).cuda()
    converted = enable_fp8(model, torch.device("cuda"))
    assert converted and not any(name.endswith(HIGH_PRECISION) for name in converted)
    modules = dict(model.named_modules())
    assert type(modules["head"]) is torch.nn.Linear and type(modules["layers.0.attn.wkv_a"]) is torch.nn.Linear
    idx = torch.randint(0, 2048, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.loss)
