"""RoRoPE conversion steps (nanoseek/convert/rorope.py) against float64 references: the per-frequency
mix across KV groups commutes with RoPE, the rope/NoPE split adds up to the original scores, the balanced
latent is the best rank-R subspace, and whole models convert exactly where nothing is truncated."""

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.convert.convert import convert_to_mla_moe
from nanoseek.convert.mla import rope_coefficients
from nanoseek.convert.rorope import balanced_latent, rope_and_nope_keys
from nanoseek.model import Transformer

H, G, D, DIM = 6, 3, 16, 48


def weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wq = torch.randn(H * D, DIM, generator=g, dtype=torch.float64)
    wk = torch.randn(G * D, DIM, generator=g, dtype=torch.float64)
    u = torch.randn(200, DIM, generator=g, dtype=torch.float64)
    return wq, wk, u


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float = 100.0) -> torch.Tensor:
    """Interleaved RoPE on the last dim of x [N, ..., 2n] at positions [N] (float64 reference)."""
    n = x.shape[-1] // 2
    angle = positions.double()[:, None] * theta ** (-torch.arange(n, dtype=torch.float64) / n)  # [N, n]
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 2)), n)
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angle), angle)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def test_mixing_groups_per_frequency_commutes_with_rope():
    # Rotating the key components by a complex G x G mix per pair (the rope key and the NoPE remainders are
    # such a mix) and rotating the queries by its inverse leaves every rotated score unchanged.
    wq, wk, u = weights()
    pairs = list(range(D // 2))
    a, w, _ = rope_coefficients(wq, wk, u, H, G, pairs)
    rope_query, rope_key, nope, _ = rope_and_nope_keys(wq, wk, u, H, G, pairs)
    pos_q, pos_k = torch.randint(0, 50, (200,)), torch.randint(0, 50, (200,))
    q = rotate((u @ wq.T).view(-1, H, D), pos_q)
    k = rotate((u @ wk.T).view(-1, G, D), pos_k)
    reference = (q * k.repeat_interleave(H // G, dim=1)).sum(-1)  # [N, H]
    q_rope = rotate((u @ rope_query.reshape(-1, DIM).T).view(-1, H, D), pos_q)
    k_rope = rotate(u @ rope_key.T, pos_k)  # [N, D]: one key for all heads
    k_nope = rotate((u @ nope.reshape(-1, DIM).T).view(-1, G, D), pos_k)  # rotated too: the identity is exact
    split = (q_rope * k_rope[:, None]).sum(-1) + (q * k_nope.repeat_interleave(H // G, dim=1)).sum(-1)
    assert torch.allclose(split, reference, atol=1e-10, rtol=0)
    assert a.shape == w.shape == (D // 2, G)


def test_rope_and_nope_scores_add_up_without_rotation():
    wq, wk, u = weights(1)
    pairs = [0, 1, 2, 5]
    rope_query, rope_key, nope, residual = rope_and_nope_keys(wq, wk, u, H, G, pairs)
    q, k = (u @ wq.T).view(-1, H, D), (u @ wk.T).view(-1, G, D)
    reference = (q * k.repeat_interleave(H // G, dim=1)).sum(-1)
    rope = ((u @ rope_query.reshape(-1, DIM).T).view(-1, H, 2 * len(pairs)) * (u @ rope_key.T)[:, None]).sum(-1)
    nope_scores = (q * (u @ nope.reshape(-1, DIM).T).view(-1, G, D).repeat_interleave(H // G, dim=1)).sum(-1)
    assert torch.allclose(rope + nope_scores, reference, atol=1e-10, rtol=0)
    assert 0 < residual < 1
    unkept = [p for p in range(D // 2) if p not in pairs]  # pairs without rope stay whole in the NoPE key
    assert torch.equal(nope.view(G, D // 2, 2, DIM)[:, unkept], wk.view(G, D // 2, 2, DIM)[:, unkept])


def test_nope_remainder_vanishes_when_groups_share_each_frequency():
    # Groups whose keys differ by a complex scalar per pair have one component per frequency: the rope key holds
    # all of it and the NoPE remainder is zero, so nothing loses its rotation.
    wq, wk, u = weights(2)
    heads = wk.view(G, D // 2, 2, DIM)
    for g in (1, 2):
        c = torch.polar(0.5 + torch.rand(D // 2, dtype=torch.float64), 6.28 * torch.rand(D // 2, dtype=torch.float64))
        heads[g, :, 0] = c.real[:, None] * heads[0, :, 0] - c.imag[:, None] * heads[0, :, 1]
        heads[g, :, 1] = c.real[:, None] * heads[0, :, 1] + c.imag[:, None] * heads[0, :, 0]
    _, _, nope, residual = rope_and_nope_keys(wq, wk, u, H, G, list(range(D // 2)))
    assert residual < 1e-12 and float((u @ nope.reshape(-1, DIM).T).abs().max()) < 1e-9


@pytest.mark.parametrize("norm", [False, True])
def test_balanced_latent_is_the_best_subspace_of_the_balanced_outputs(norm):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(G, D, DIM, generator=g, dtype=torch.float64) * 3.0
    values = torch.randn(G, D, DIM, generator=g, dtype=torch.float64)
    u = torch.randn(300, DIM, generator=g, dtype=torch.float64)
    rank = 20
    down, up, gamma, error = balanced_latent(keys, values, u, rank, 1e-6, norm=False)
    # Reference: the relative error of the best rank-R approximation of the balanced outputs (Eckart-Young).
    k_out, v_out = u @ keys.reshape(-1, DIM).T, u @ values.reshape(-1, DIM).T
    alpha = (k_out.pow(2).mean() / v_out.pow(2).mean()).sqrt()
    outputs = torch.cat([(k_out / alpha).view(-1, G, D), v_out.view(-1, G, D)], dim=2).reshape(300, -1)
    sing = torch.linalg.svdvals(outputs)
    assert error == pytest.approx(float(sing[rank:].pow(2).sum().sqrt() / sing.pow(2).sum().sqrt()), rel=1e-9)
    full = torch.cat([keys, values], dim=1).reshape(-1, DIM)  # the up-projection undoes the balance
    best = (u @ down.T) @ up.T
    residual = float((best - u @ full.T).norm() / (u @ full.T).norm())
    assert residual < 1.0 and bool((gamma == 1).all())
    if norm:  # full rank with room to spare and inputs at unit RMS (as after attn_norm): the normalised latent
        # has a constant scale, which the norm's weight undoes
        unit = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True))
        down, up, gamma, error = balanced_latent(keys[:1, :4], values[:1, :4], unit, DIM, 1e-12, norm=True)
        assert error < 1e-6


@pytest.mark.parametrize("kv_latent_norm", [True, False])
def test_full_rank_mqa_rorope_reproduces_the_dense_logits(kv_latent_norm):
    torch.manual_seed(0)
    cfg = ModelConfig(attention="gqa", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, inter_dim=96,
                      n_routed_experts=0, mtp_depth=0, max_seq_len=64, init_std=0.1, rope_theta=500.0)
    dense = Transformer(cfg).eval()
    calib = torch.randint(0, 128, (6, 48), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(2))
    converted, report = convert_to_mla_moe(dense, calib, kv_lora_rank=64, rope_dims=16, method="rorope",
                                           kv_latent_norm=kv_latent_norm, log=None)
    c = converted.config
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_latent_norm) == (16, 16, 16, kv_latent_norm)
    with torch.no_grad():
        assert float((dense(held).logits - converted(held).logits).abs().max()) < 2e-4
    if kv_latent_norm:  # the fitted gain lives in wkv_b, so Adam's steps on wkv_b are not multiplied by it
        assert all(torch.equal(layer.attn.kv_norm.weight, torch.ones(64)) for layer in converted.layers)


def test_export_without_latent_norm_adds_it_back_with_the_typical_rms(tmp_path):
    # transformers' DeepseekV3 always normalises the latent: the export writes the latent's calibrated RMS as
    # kv_a_layernorm's weight, warns, and loads; nanoseek's own forward is the one without the norm.
    import json
    import warnings

    transformers = pytest.importorskip("transformers")
    from nanoseek.interop import export_hf

    torch.manual_seed(0)
    cfg = ModelConfig(attention="gqa", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=96,
                      n_routed_experts=0, mtp_depth=0, max_seq_len=64, init_std=0.1, rope_theta=500.0, norm_eps=1e-6)
    dense = Transformer(cfg).eval()
    calib = torch.randint(0, 128, (6, 48), generator=torch.Generator().manual_seed(1))
    converted, _ = convert_to_mla_moe(dense, calib, kv_lora_rank=24, rope_dims=16, kv_latent_norm=False, log=None)
    rms = [float(block.attn.latent_rms) for block in converted.layers]
    assert all(r > 0 and r != 1.0 for r in rms)
    with pytest.warns(UserWarning, match="kv_latent_norm=False"):
        export_hf(converted, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["kv_lora_rank"] == 24
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    for block, r in zip(hf.model.layers, rms):
        assert torch.allclose(block.self_attn.kv_a_layernorm.weight, torch.full((24,), r))
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all()


def test_anchor_makes_the_latent_norm_steady_when_the_input_has_a_steady_direction():
    # Real residual streams carry a few huge, nearly constant dims; an anchor along the steadiest direction
    # dominates the latent's RMS, so the RMSNorm scales every token alike and the fitted weight undoes it.
    from nanoseek.convert.rorope import _fit_latent, _steady_latent_norm

    g = torch.Generator().manual_seed(5)
    u = torch.randn(400, DIM, generator=g, dtype=torch.float64)
    u[:, 0] += 15.0
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True))  # unit RMS, as after attn_norm
    rows = torch.linalg.qr(torch.randn(DIM - 1, 12, generator=g, dtype=torch.float64)).Q.T  # [12, DIM-1]
    m = torch.zeros(12, DIM, dtype=torch.float64)
    # the keys/values do not read the steady dim (so the plain latent's norm varies with the rest), and their
    # spectrum decays, as real ones do, so giving the weakest of six components to the anchor costs little
    m[:, 1:] = rows * torch.logspace(0, -2, 12, dtype=torch.float64)[:, None]
    outputs = u @ m.T
    basis = torch.linalg.eigh(outputs.T @ outputs).eigenvectors.flip(-1)[:, :6]
    down, up = basis.T @ m, basis.clone()
    _, plain = _fit_latent(down, up, u, outputs, 1e-6, norm=True)
    _steady_latent_norm(down, up, 6, u)
    latent_rms = (u @ down.T).pow(2).mean(-1).sqrt()
    _, steady = _fit_latent(down, up, u, outputs, 1e-6, norm=True)
    _, unnormed = _fit_latent(basis.T @ m, basis, u, outputs, 1e-6, norm=False)
    assert float(latent_rms.std() / latent_rms.mean()) < 0.05
    assert steady < 0.5 * plain and steady < unnormed + 0.05  # the anchor costs one of six components


def test_an_odd_latent_rank_decodes_from_the_cache():
    # The rope key is sliced after kv_lora_rank latent values: with an odd rank a single decoded token's slice
    # starts at an odd offset, which complex views refuse unless realigned.
    from nanoseek.generate import Sampling, generate

    cfg = ModelConfig(attention="mla", vocab_size=64, dim=32, n_layers=1, n_heads=2, kv_lora_rank=7,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=0, mtp_depth=0,
                      max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, 64, (1, 5))
    cached = generate(model, prompt, 6, Sampling(temperature=0.0))
    uncached = generate(model, prompt, 6, Sampling(temperature=0.0), use_cache=False)
    assert torch.equal(cached, uncached)
