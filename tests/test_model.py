"""The Transformer and its attention: each check against a slower obvious implementation, a float64
computation or a hand-computed value."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.attention import GQAttention, KVCache, LatentCache, MLAttention
from nanoseek.model.layers import RotaryEmbedding
from nanoseek.model.transformer import IGNORE_INDEX, eval_mode

VOCAB = 64


def mla_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=64,
                n_routed_experts=0, mtp_depth=0)
    base.update(overrides)
    return ModelConfig(**base)


def gqa_config(**overrides) -> ModelConfig:
    base = dict(attention="gqa", n_kv_heads=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32)
    base.update(overrides)
    return mla_config(**base)


def moe_config(**overrides) -> ModelConfig:
    base = dict(n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16,
                n_dense_layers=1)
    base.update(overrides)
    return mla_config(**base)


CONFIGS = {
    "gqa": lambda **kw: gqa_config(**kw),
    "mla": lambda **kw: mla_config(**kw),
    "mla-qlora-moe": lambda **kw: moe_config(q_lora_rank=12, **kw),
}


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def tokens(*shape: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Weights large enough that attention is far from uniform (init_std 0.02 makes it nearly flat)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def set_eager(model: torch.nn.Module, eager: bool) -> None:
    for module in model.modules():
        if isinstance(module, (GQAttention, MLAttention)):
            module.eager = eager


def manual_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over positions whose target is not IGNORE_INDEX, in float64."""
    logp = logits.double().log_softmax(-1)
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


# ---- float64 references for RoPE and attention ---------------------------------------------------


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Interleaved RoPE in float64: pair (x[2i], x[2i+1]) at position m rotates by m * theta^(-2i/d).
    x: [..., T, d], positions: [T]."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.double()[:, None] * inv_freq  # [T, d/2]
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_softmax_attention(q, k, v, scale, key_mask=None):
    """One head, float64: q [T, d], k [S, d], v [S, dv], query t sees keys s <= t (and real keys)."""
    scores = (q @ k.T) * scale
    allowed = torch.ones_like(scores, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed &= key_mask.bool()[None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.nan_to_num(probs, nan=0.0) @ v, scores.masked_fill(~allowed, float("-inf"))


def mla_reference(attn: MLAttention, cfg: ModelConfig, x: torch.Tensor, key_mask=None):
    """Multi-head Latent Attention written head by head in float64 (DeepSeek-V2 section 2.1).

    Returns (output [B, T, dim], max logit per head [H])."""
    w = {name: p.detach().double() for name, p in attn.named_parameters()}
    x = x.detach().double()
    bsz, seq_len, _ = x.shape
    nope, rope, dv, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    positions = torch.arange(seq_len)
    scale = (nope + rope) ** -0.5
    outputs, max_logit = [], torch.full((cfg.n_heads,), float("-inf"), dtype=torch.float64)
    for b in range(bsz):
        if cfg.q_lora_rank:
            q_all = rms_norm_reference(x[b] @ w["wq_a.weight"].T, w["q_norm.weight"], cfg.norm_eps) @ w["wq_b.weight"].T
        else:
            q_all = x[b] @ w["wq.weight"].T  # [T, H * (nope + rope)]
        compressed = x[b] @ w["wkv_a.weight"].T
        c_kv = rms_norm_reference(compressed[:, :rank], w["kv_norm.weight"], cfg.norm_eps)  # [T, rank]
        k_rope = rope_reference(compressed[:, rank:], positions, cfg.rope_theta)  # one rope key for all heads
        heads = []
        for h in range(cfg.n_heads):
            q_h = q_all[:, h * (nope + rope):(h + 1) * (nope + rope)]
            q_h = torch.cat([q_h[:, :nope], rope_reference(q_h[:, nope:], positions, cfg.rope_theta)], -1)
            up = w["wkv_b.weight"][h * (nope + dv):(h + 1) * (nope + dv)]
            k_h = torch.cat([c_kv @ up[:nope].T, k_rope], -1)
            v_h = c_kv @ up[nope:].T
            out_h, scores = causal_softmax_attention(q_h, k_h, v_h, scale, None if key_mask is None else key_mask[b])
            heads.append(out_h)
            max_logit[h] = max(max_logit[h], scores.max())
        outputs.append(torch.cat(heads, -1) @ w["wo.weight"].T)
    return torch.stack(outputs), max_logit


@pytest.mark.parametrize("dims", [
    dict(qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    dict(qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, q_lora_rank=10),
    dict(qk_nope_head_dim=85, qk_rope_head_dim=6, v_head_dim=85, n_heads=3),  # SmolLM2 -> DeepSeek shapes
])
@pytest.mark.parametrize("eager", [False, True])
def test_mla_matches_float64_reference(dims, eager):
    cfg = mla_config(**dims)
    attn = MLAttention(cfg)
    randomize(attn)
    attn.eager = eager
    x = torch.randn(2, 9, cfg.dim, generator=torch.Generator().manual_seed(1))
    out = attn(x)
    ref, _ = mla_reference(attn, cfg, x)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_mla_odd_head_dims_forward_backward():
    cfg = mla_config(dim=48, n_heads=3, kv_lora_rank=32, qk_nope_head_dim=85, qk_rope_head_dim=16,
                     v_head_dim=85, mtp_depth=1)
    model = build(cfg)
    out = model(tokens(2, 12), tokens(2, 13, seed=1))
    out.loss.backward()
    assert out.logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].attn.wkv_b.weight.shape == (3 * (85 + 85), 32)


# ---- GQA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gqa_equals_mha_with_repeated_kv(n_kv_heads, qk_norm):
    gqa_cfg = gqa_config(n_kv_heads=n_kv_heads, qk_norm=qk_norm)
    mha_cfg = gqa_config(n_kv_heads=gqa_cfg.n_heads, qk_norm=qk_norm)
    gqa, mha = GQAttention(gqa_cfg), GQAttention(mha_cfg)
    randomize(gqa)
    head_dim, group = gqa_cfg.head_dim, gqa_cfg.n_heads // n_kv_heads
    with torch.no_grad():
        for name in ("wq", "wo"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("wk", "wv"):  # MHA head h holds a copy of KV head h // group
            per_head = getattr(gqa, name).weight.view(n_kv_heads, head_dim, -1)
            getattr(mha, name).weight.copy_(per_head.repeat_interleave(group, dim=0).flatten(0, 1))
        if qk_norm:
            mha.q_norm.weight.copy_(gqa.q_norm.weight)
            mha.k_norm.weight.copy_(gqa.k_norm.weight)
    x = torch.randn(2, 10, gqa_cfg.dim, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=1e-5)


def test_gqa_matches_float64_reference():
    cfg = gqa_config(n_kv_heads=2)
    attn = GQAttention(cfg)
    randomize(attn)
    x = torch.randn(2, 9, cfg.dim, generator=torch.Generator().manual_seed(3))
    w = {name: p.detach().double() for name, p in attn.named_parameters()}
    d, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    positions = torch.arange(9)
    refs = []
    for b in range(2):
        xb = x[b].double()
        heads = []
        for h in range(cfg.n_heads):
            kv = h // group
            q = rope_reference(xb @ w["wq.weight"][h * d:(h + 1) * d].T, positions, cfg.rope_theta)
            k = rope_reference(xb @ w["wk.weight"][kv * d:(kv + 1) * d].T, positions, cfg.rope_theta)
            v = xb @ w["wv.weight"][kv * d:(kv + 1) * d].T
            heads.append(causal_softmax_attention(q, k, v, d ** -0.5)[0])
        refs.append(torch.cat(heads, -1) @ w["wo.weight"].T)
    torch.testing.assert_close(attn(x).double(), torch.stack(refs), atol=2e-5, rtol=1e-5)


# ---- whole model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,overrides,keys", [
    ("tiny", {}, {"ce", "mtp_1"}),
    ("tiny", dict(aux_loss_coef=0.01, router_z_loss_coef=1e-3, mtp_depth=2), {"ce", "mtp_1", "mtp_2", "aux", "z"}),
    ("tiny", dict(mtp_kind="shared", mtp_depth=3, logit_z_loss_coef=1e-4), {"ce", "mtp_1", "mtp_2", "mtp_3", "logit_z"}),
    ("tiny-dense", {}, {"ce"}),
    ("tiny-gqa", dict(aux_loss_coef=0.01), {"ce"}),  # no MoE layer: no aux term
])
def test_forward_shapes_and_loss_components(preset, overrides, keys):
    cfg = ModelConfig.from_preset(preset, vocab_size=256, n_layers=3, **overrides)  # the preset's shape, smaller
    model = build(cfg)
    bsz, seq_len = 2, 16
    idx = tokens(bsz, seq_len, vocab=cfg.vocab_size)
    assert model(idx).logits.shape == (bsz, seq_len, cfg.vocab_size)
    out = model(idx, tokens(bsz, seq_len + cfg.mtp_depth, seed=1, vocab=cfg.vocab_size))
    assert out.logits.shape == (bsz, seq_len, cfg.vocab_size)
    assert set(out.losses) == keys
    mtp = [v for k, v in out.losses.items() if k.startswith("mtp_")]
    expected = out.losses["ce"] + sum(out.losses.get(k, 0.0) for k in ("aux", "z", "logit_z"))
    if mtp:
        expected = expected + cfg.mtp_weight * sum(mtp) / len(mtp)  # DeepSeek-V3 eq. 25
    torch.testing.assert_close(out.loss, expected)
    assert out.losses["ce"].item() == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # small init ~ uniform
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_eager_fp32_softmax_equals_sdpa(kind):
    model = build(CONFIGS[kind]()).eval()
    randomize(model, std=0.1)
    idx = tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    for attention_mask in (None, mask):
        set_eager(model, False)
        fast = model(idx, attention_mask=attention_mask).logits
        set_eager(model, True)
        eager = model(idx, attention_mask=attention_mask).logits
        torch.testing.assert_close(eager, fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_left_padding(kind):
    cfg = CONFIGS[kind]()
    model = build(cfg)
    randomize(model, std=0.1)
    model.eval()
    pad = 4
    long_seq, short_seq = tokens(1, 10, seed=1), tokens(1, 6, seed=2)
    idx = torch.cat([long_seq, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_seq], 1)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :pad] = 0
    attn_out = {}
    hook = model.layers[0].attn.register_forward_hook(lambda m, a, out: attn_out.setdefault("x", out))
    targets = tokens(2, 10, seed=3)
    targets[1, :pad] = IGNORE_INDEX
    out = model(idx, targets, attention_mask=mask)
    hook.remove()
    assert torch.isfinite(out.logits).all()
    assert torch.all(attn_out["x"][1, :pad] == 0)  # pad queries see no key: zero output, not NaN
    assert attn_out["x"][1, pad:].abs().sum() > 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # RoPE is relative, so the shifted real tokens give the unpadded sequence's logits
    torch.testing.assert_close(out.logits[1, pad:], model(short_seq).logits[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[0], model(long_seq).logits[0], atol=2e-5, rtol=1e-5)


def test_noncontiguous_inputs_equal_contiguous():
    cfg = moe_config(mtp_depth=1)
    model = build(cfg)
    base = tokens(20, 3)  # [T, B]: its transpose is a non-contiguous [B, T]
    idx = base.t()[:, :16]
    targets = tokens(3, 34, seed=1)[:, ::2]  # stride-2 view [3, 17]
    assert not idx.is_contiguous() and not targets.is_contiguous()
    view = model(idx, targets)
    dense = model(idx.contiguous(), targets.contiguous())
    torch.testing.assert_close(view.logits, dense.logits, atol=0, rtol=0)
    torch.testing.assert_close(view.loss, dense.loss, atol=0, rtol=0)


def test_activation_checkpointing_same_loss_and_grads():
    cfg = moe_config(n_layers=3, mtp_depth=1, aux_loss_coef=0.01, router_z_loss_coef=1e-3)
    model = build(cfg).train()
    idx, targets = tokens(2, 12), tokens(2, 13, seed=1)
    plain = model(idx, targets)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    ckpt = model(idx, targets)
    ckpt.loss.backward()
    torch.testing.assert_close(ckpt.loss, plain.loss, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_bf16_autocast_forward_backward_on_cpu(preset):
    cfg = ModelConfig.from_preset(preset, n_layers=2)
    model = build(cfg)
    idx, targets = tokens(2, 16, vocab=cfg.vocab_size), tokens(2, 16 + cfg.mtp_depth, seed=1, vocab=cfg.vocab_size)
    reference = model(idx, targets).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, targets)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(reference, rel=2e-2)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


# ---- KV caches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_incremental_decoding_matches_full_forward(kind, padded):
    cfg = CONFIGS[kind]()
    model = build(cfg)
    randomize(model, std=0.1)
    model.eval()
    bsz, seq_len, prompt = 2, 14, 5
    idx = tokens(bsz, seq_len, seed=4)
    mask = torch.ones(bsz, seq_len, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    attention_mask = mask if padded else None
    full = model(idx, attention_mask=attention_mask).logits
    caches = model.new_caches(bsz, max_len=seq_len)
    expected_cache = LatentCache if cfg.attention == "mla" else KVCache
    assert all(isinstance(c, expected_cache) for c in caches)
    steps = [model(idx[:, :prompt], attention_mask=mask[:, :prompt] if padded else None, caches=caches).logits]
    for pos in range(prompt, seq_len):
        step_mask = mask[:, :pos + 1] if padded else None
        steps.append(model(idx[:, pos:pos + 1], attention_mask=step_mask, caches=caches, start_pos=pos).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)


def test_cache_sizes():
    mla = build(mla_config(n_heads=8, dim=64, kv_lora_rank=16, qk_rope_head_dim=8))
    mha = build(gqa_config(n_heads=8, n_kv_heads=8, dim=64))  # same width and heads, full K/V
    for dtype in (torch.float32, torch.bfloat16):
        latent = mla.new_caches(2, max_len=10, dtype=dtype)
        full = mha.new_caches(2, max_len=10, dtype=dtype)
        size = torch.tensor([], dtype=dtype).element_size()
        assert latent[0].bytes_per_token() == (16 + 8) * size
        assert full[0].bytes_per_token() == 2 * 8 * 8 * size
        assert latent[0].bytes_per_token() * 5 < full[0].bytes_per_token()
        assert latent[0].nbytes() == latent[0].bytes_per_token() * 2 * 10
        assert full[0].nbytes() == full[0].bytes_per_token() * 2 * 10
        for model, caches in ((mla, latent), (mha, full)):
            assert model.kv_bytes_per_token(dtype) == sum(c.bytes_per_token() for c in caches)
    # the preset shapes: MLA's cache is a small fraction of MHA's at the same heads and head width
    medium = ModelConfig.from_preset("medium")
    mha_values = 2 * medium.n_heads * (medium.qk_nope_head_dim + medium.qk_rope_head_dim)
    assert medium.kv_cache_values_per_token() == 256 + 32
    assert medium.kv_cache_values_per_token() * 5 < mha_values


# ---- multi-token prediction ----------------------------------------------------------------------


def test_shared_mtp_losses_match_manual_cross_entropy():
    depth = 3
    cfg = mla_config(mtp_kind="shared", mtp_depth=depth)
    model = build(cfg)
    randomize(model, std=0.1)
    bsz, seq_len = 2, 10
    idx = tokens(bsz, seq_len)
    targets = tokens(bsz, seq_len + depth, seed=1)
    targets[0, 4] = IGNORE_INDEX
    out = model(idx, targets)
    for k in range(1, depth + 1):  # targets[:, k:k+T] are the tokens k+1 ahead
        expected = manual_cross_entropy(out.logits, targets[:, k:k + seq_len])
        assert out.losses[f"mtp_{k}"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(manual_cross_entropy(out.logits, targets[:, :seq_len]).item(), rel=1e-5)
    # [B, T] targets: depth k scores only the first T - k positions
    short = model(idx, targets[:, :seq_len])
    for k in range(1, depth + 1):
        expected = manual_cross_entropy(out.logits[:, :seq_len - k], targets[:, k:seq_len])
        assert short.losses[f"mtp_{k}"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mtp_modules_losses_match_manual_computation():
    depth = 2
    cfg = moe_config(mtp_depth=depth, mtp_kind="modules")
    model = build(cfg)
    randomize(model, std=0.1)
    model.eval()
    bsz, seq_len = 2, 9
    idx, targets = tokens(bsz, seq_len), tokens(bsz, seq_len + depth, seed=1)
    out = model(idx, targets)
    hidden = model.embed(idx)
    for block in model.layers:
        hidden = block(hidden)
    for k, module in enumerate(model.mtp, start=1):
        # DeepSeek-V3 eq. 21-22: combine h^{k-1}_i with the embedding of token i+k, one block, shared head
        next_embed = model.embed(targets[:, k - 1:k - 1 + seq_len])
        hidden = module.block(module.eh_proj(torch.cat([module.enorm(next_embed), module.hnorm(hidden)], -1)))
        logits = model.head(module.norm(hidden))
        expected = manual_cross_entropy(logits, targets[:, k:k + seq_len])
        assert out.losses[f"mtp_{k}"].item() == pytest.approx(expected.item(), rel=1e-5)
    expected_total = out.losses["ce"] + cfg.mtp_weight * (out.losses["mtp_1"] + out.losses["mtp_2"]) / 2
    torch.testing.assert_close(out.loss, expected_total)


# ---- parameters and initialisation ---------------------------------------------------------------


def test_tied_embeddings_share_storage():
    model = build(mla_config(tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = build(mla_config())
    assert untied.num_params() - model.num_params() == VOCAB * 32
    out = model(tokens(2, 8), tokens(2, 8, seed=1))
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_residual_projections_init_scaled_by_depth():
    n_layers, std = 8, 0.02
    cfg = moe_config(n_layers=n_layers, dim=128, n_heads=4, qk_nope_head_dim=32, v_head_dim=32,
                     inter_dim=256, moe_inter_dim=64, n_routed_experts=4, init_std=std, mtp_depth=1)
    model = build(cfg)
    truncation = 0.98658  # std of a normal truncated at +-3 sigma, in units of sigma
    residual_std = std / math.sqrt(2 * n_layers) * truncation
    residual = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                          if n.endswith(("attn.wo.weight", "w2.weight", "experts.w2"))])
    others = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                        if p.ndim > 1 and not n.endswith(("attn.wo.weight", "w2.weight", "experts.w2"))])
    assert residual.numel() > 50_000 and others.numel() > 50_000
    assert residual.std().item() == pytest.approx(residual_std, rel=0.03)
    assert others.std().item() == pytest.approx(std * truncation, rel=0.03)
    assert residual.abs().max() <= 3 * std / math.sqrt(2 * n_layers) + 1e-9
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name
    for _, moe in model.moe_layers():
        assert torch.all(moe.gate.balance_bias == 0)


def test_num_params_hand_count():
    cfg = moe_config(vocab_size=50, dim=16, n_layers=3, n_heads=2, kv_lora_rank=6, qk_nope_head_dim=4,
                     qk_rope_head_dim=2, v_head_dim=5, inter_dim=20, n_dense_layers=1, n_routed_experts=5,
                     n_shared_experts=2, n_activated_experts=2, moe_inter_dim=3, mtp_depth=1)
    model = build(cfg)
    d, heads = 16, 2
    attn = (d * heads * (4 + 2)       # wq
            + d * (6 + 2)            # wkv_a: latent + rope key
            + 6                      # kv_norm
            + 6 * heads * (4 + 5)    # wkv_b
            + heads * 5 * d)         # wo
    norms = 2 * d
    dense_ffn = 3 * d * 20
    expert = 3 * d * 3
    moe_total = 5 * d + 5 * expert + 3 * d * (2 * 3)  # gate, routed, shared (2 x 3 wide)
    moe_active = 5 * d + 2 * expert + 3 * d * (2 * 3)
    mtp_extra = 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, norm
    outside = 50 * d + 50 * d + d  # embed, head, final norm

    total = outside + 3 * (attn + norms) + dense_ffn + 2 * moe_total + (attn + norms + moe_total + mtp_extra)
    active = outside + 3 * (attn + norms) + dense_ffn + 2 * moe_active + (attn + norms + moe_active + mtp_extra)
    assert model.num_params() == total == sum(p.numel() for p in model.parameters())
    assert model.num_params(active=True) == active
    assert model.num_params(active=True, include_mtp=False) == active - (attn + norms + moe_active + mtp_extra)
    assert model.num_params(include_embedding=False) == total - 50 * d


# ---- rotary embeddings ---------------------------------------------------------------------------


def test_rope_dot_product_depends_only_on_offset():
    cfg = mla_config(max_seq_len=8192, rope_theta=10000.0)
    rotary = RotaryEmbedding(32, cfg)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64) for _ in range(2))

    def score(m: int, n: int) -> float:
        return (rotary(q, start_pos=m) * rotary(k, start_pos=n)).sum().item()

    for offset in (0, 3, 17, 250):
        values = [score(n + offset, n) for n in (0, 100, 4000, 8000 - offset)]
        assert max(values) - min(values) < 1e-5, (offset, values)  # fp32 angles would be off by ~1e-3
    # and it equals the float64 reference rotation
    ref_q = rope_reference(q[0, :, 0], torch.tensor([7000]), cfg.rope_theta)
    torch.testing.assert_close(rotary(q, start_pos=7000)[0, :, 0], ref_q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_complex_and_compiled_real_forms_agree_with_the_reference(dtype, monkeypatch):
    """Eager rotates pairs as complex numbers; under torch.compile the same rotation runs in real arithmetic."""
    cfg = ModelConfig.from_preset("tiny-dense", max_seq_len=32)
    rope = RotaryEmbedding(12, cfg)
    x = torch.randn(2, 9, 3, 12, dtype=torch.float64)
    expected = rope_reference(x.transpose(1, 2), torch.arange(5, 14), cfg.rope_theta).transpose(1, 2)
    eager = rope(x.to(dtype), start_pos=5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = rope(x.to(dtype), start_pos=5)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert eager.dtype == real.dtype == dtype
    torch.testing.assert_close(eager.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(real.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(eager, real, atol=tol, rtol=0)


def test_rope_linear_and_yarn_scaling_of_inv_freq():
    dim, theta, factor, original = 32, 10000.0, 4.0, 512
    base = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    plain = RotaryEmbedding(dim, mla_config(max_seq_len=2048))
    torch.testing.assert_close(plain.inv_freq, base, rtol=1e-12, atol=0)

    linear = RotaryEmbedding(dim, mla_config(max_seq_len=2048, rope_scaling="linear", rope_factor=factor))
    torch.testing.assert_close(linear.inv_freq, base / factor, rtol=1e-12, atol=0)  # positions / factor

    cfg = mla_config(max_seq_len=2048, rope_scaling="yarn", rope_factor=factor,
                     rope_original_max_seq_len=original, beta_fast=32.0, beta_slow=1.0)
    yarn = RotaryEmbedding(dim, cfg)
    # YaRN section 3.2: a pair that turns more than beta_fast times over the original context keeps its
    # frequency, one that turns less than beta_slow times is interpolated (/ factor), others in between.
    rotations = original * base / (2 * math.pi)
    fast, slow = rotations > 32.0, rotations < 1.0
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(yarn.inv_freq[fast], base[fast], rtol=1e-12, atol=0)
    torch.testing.assert_close(yarn.inv_freq[slow], base[slow] / factor, rtol=1e-12, atol=0)
    middle = ~fast & ~slow
    assert torch.all(yarn.inv_freq[middle] <= base[middle]) and torch.all(yarn.inv_freq[middle] >= base[middle] / factor)
    ratio = base / yarn.inv_freq  # 1 -> factor, non-decreasing from high to low frequencies
    assert torch.all(ratio[1:] >= ratio[:-1] - 1e-12)
    # the attention temperature: cos/sin tables carry 0.1 ln(s) + 1 (YaRN eq. 8)
    magnitude = yarn.table(torch.complex128, torch.device("cpu")).abs()
    torch.testing.assert_close(magnitude, torch.full_like(magnitude, 0.1 * math.log(factor) + 1), atol=1e-6, rtol=0)


# ---- QK-clip -------------------------------------------------------------------------------------


def test_qk_clip_reduces_every_layers_max_logits_in_one_call():
    """Under data parallelism the max logits of all MLA layers go through one collective, and the clip
    uses the reduced values (here a stand-in reduce that raises every head to 10)."""
    cfg = mla_config(n_layers=2, qk_clip_threshold=4.0)
    model = build(cfg)
    calls = []

    def reduce(flat: torch.Tensor) -> None:
        calls.append(flat.numel())
        flat.fill_(10.0)

    layers = [attn for _, attn in model.attention_layers()]
    for attn in layers:
        attn.max_logit.fill_(1.0)  # locally nothing to clip
    saved = [attn.wkv_b.weight.detach().clone() for attn in layers]
    model.apply_qk_clip(reduce)
    assert calls == [cfg.n_layers * cfg.n_heads]
    for attn, before in zip(layers, saved):
        assert torch.all(attn.max_logit == 10.0)
        assert not torch.equal(attn.wkv_b.weight, before)  # every head clipped by sqrt(4 / 10)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_qk_clip_brings_max_logit_back_to_threshold(q_lora_rank):
    threshold = 4.0
    cfg = mla_config(n_layers=1, qk_clip_threshold=threshold, q_lora_rank=q_lora_rank)
    model = build(cfg)
    randomize(model, std=0.15)
    attn = model.layers[0].attn
    wq = attn.wq_b if q_lora_rank else attn.wq
    head_rows = cfg.qk_head_dim
    with torch.no_grad():  # head 1 and head 3 become very sharp
        wq.weight[1 * head_rows:2 * head_rows] *= 25
        wq.weight[3 * head_rows:4 * head_rows] *= 12
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    idx = tokens(2, 16)
    model(idx)
    _, before = mla_reference(attn, cfg, seen["x"])
    torch.testing.assert_close(attn.max_logit.double(), before, atol=1e-4, rtol=1e-5)  # tracking is right
    clipped = before > threshold
    assert clipped.tolist() == [False, True, False, True], before
    saved = {n: p.detach().clone() for n, p in attn.named_parameters()}
    model.apply_qk_clip()
    model(idx)  # same attention input: only the attention weights changed
    _, after = mla_reference(attn, cfg, seen["x"])
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], threshold), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(after[~clipped], before[~clipped], atol=0, rtol=0)
    qv = wq.weight.view(cfg.n_heads, head_rows, -1)
    kv = attn.wkv_b.weight.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
    saved_q = saved[("wq_b" if q_lora_rank else "wq") + ".weight"].view_as(qv)
    saved_kv = saved["wkv_b.weight"].view_as(kv)
    for h in (0, 2):  # untouched heads keep their weights bit for bit
        assert torch.equal(qv[h], saved_q[h]) and torch.equal(kv[h], saved_kv[h])
    assert torch.equal(kv[:, cfg.qk_nope_head_dim:], saved_kv[:, cfg.qk_nope_head_dim:])  # values never scaled
    for name in ("wkv_a.weight", "wo.weight", "kv_norm.weight"):
        assert torch.equal(getattr(attn, name.split(".")[0]).weight, saved[name])


def test_eval_mode_restores_the_previous_mode_even_after_an_error():
    model = build(moe_config(dropout=0.1))
    for training in (True, False):
        model.train(training)
        with pytest.raises(RuntimeError), eval_mode(model):
            assert not model.training and not any(m.training for m in model.modules())
            raise RuntimeError("inside")
        assert all(m.training == training for m in model.modules())
