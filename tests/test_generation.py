"""Decoding: the KV / latent cache changes speed, never the tokens; sampling; speculative decoding."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.generate import GREEDY, Sampling, generate, sample_next, stream
from nanoseek.model.attention import MLAttention
from nanoseek.speculative import speculative_generate
from tiny import ARCHITECTURES

VOCAB = 97


def tiny(preset: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=VOCAB, max_seq_len=64, **overrides)
    return Transformer(cfg).double().eval()  # float64: no argmax flips from rounding-order ties


def greedy_without_cache(model, prompt, n):
    tokens = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    return tokens




@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_cached_greedy_equals_full_recompute_over_40_tokens(arch):
    preset, overrides = ARCHITECTURES[arch]
    model = tiny(preset, **overrides)
    prompt = torch.randint(0, VOCAB, (2, 5))
    expected = greedy_without_cache(model, prompt, 40)
    assert torch.equal(generate(model, prompt, 40, GREEDY), expected)
    assert torch.equal(generate(model, prompt, 40, GREEDY, use_cache=False), expected)


def test_mla_decodes_from_the_latent_without_expanding_keys_and_values():
    model = tiny("tiny")
    expansions = []
    for layer in model.layers:
        layer.attn.wkv_b.register_forward_hook(lambda *_: expansions.append(1))
    prompt = torch.randint(0, VOCAB, (2, 6))
    caches = model.new_caches(2, 32)
    absorbed = [model(prompt, caches=caches).logits]
    tokens = prompt
    for pos in range(6, 16):
        nxt = absorbed[-1][:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        absorbed.append(model(nxt, caches=caches, start_pos=pos).logits)
    assert expansions == []  # wkv_b is only ever read as a weight, never run over the cache
    for layer in model.layers:
        layer.attn.absorb = False  # the training-time path: expand K and V per head
    naive = model(tokens[:, :-1]).logits
    assert torch.allclose(torch.cat(absorbed, dim=1)[:, :15], naive, atol=1e-10)
    assert expansions  # and that path does expand


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_cache_bytes_follow_the_formula(preset):
    model = Transformer(ModelConfig.from_preset(preset))
    cfg = model.config
    batch, max_len = 3, 40
    caches = model.new_caches(batch, max_len, dtype=torch.bfloat16)
    if cfg.attention == "mla":
        per_token_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        assert all(isinstance(layer.attn, MLAttention) for layer in model.layers)
    else:
        per_token_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    expected = per_token_layer * cfg.n_layers * 2  # bf16: 2 bytes
    assert model.kv_bytes_per_token(torch.bfloat16) == expected
    assert sum(c.bytes_per_token() for c in caches) == expected
    assert sum(c.nbytes() for c in caches) == expected * batch * max_len


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = tiny("tiny-gqa")
    prompt = torch.randint(0, VOCAB, (2, 4))
    hot = Sampling(temperature=1.5, top_k=0)
    first = generate(model, prompt, 20, hot, generator=torch.Generator().manual_seed(7))
    again = generate(model, prompt, 20, hot, generator=torch.Generator().manual_seed(7))
    other = generate(model, prompt, 20, hot, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    top1 = generate(model, prompt, 20, Sampling(temperature=1.5, top_k=1), generator=torch.Generator().manual_seed(8))
    assert torch.equal(top1, generate(model, prompt, 20, GREEDY))
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1, keepdim=True))


def test_temperature_sharpens_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    cold = [sample_next(logits, 0.2, 0, 1.0, gen).item() for _ in range(300)]
    hot = [sample_next(logits, 5.0, 0, 1.0, gen).item() for _ in range(300)]
    assert cold.count(0) > 290  # p(0) ~ 0.993 at T=0.2
    assert 60 < hot.count(0) < 140 and len(set(hot)) == 4  # near uniform at T=5: p(0) ~ 0.33


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0, 0.7, gen).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: token 2 and 3 are never drawn


def test_bad_sampling_settings_are_refused():
    for bad in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_eos_stops_and_pads_finished_rows():
    model = tiny("tiny-gqa")
    prompt = torch.randint(0, VOCAB, (1, 4))
    first = generate(model, prompt, 1, GREEDY)[0, -1].item()
    out = generate(model, prompt, 20, GREEDY, eos_id=first)
    assert out.shape[1] == 5  # stopped right after producing eos
    batch = torch.cat([prompt, torch.randint(0, VOCAB, (1, 4))])
    rows = generate(model, batch, 30, GREEDY, eos_id=first)
    assert rows.shape[1] > 5 or bool((rows[:, 4] == first).all())  # row 1 went on unless it also ended
    assert bool((rows[0, 4:] == first).all())  # row 0 ended at once and is padded with eos


def test_prompt_longer_than_the_context_is_an_error_or_truncated():
    model = tiny("tiny-gqa")
    long_prompt = torch.randint(0, VOCAB, (1, 80))  # max_seq_len is 64
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, long_prompt, 5, GREEDY)
    out = generate(model, long_prompt, 5, GREEDY, truncate=True)
    assert out.shape[1] == 64  # the last 63 prompt tokens, then one new token fills the context
    assert torch.equal(out[:, :63], long_prompt[:, -63:])
    with pytest.raises(ValueError, match="empty"):
        generate(model, long_prompt[:, :0], 5, GREEDY)


def test_stream_yields_one_token_at_a_time():
    model = tiny("tiny")
    prompt = torch.randint(0, VOCAB, (1, 3))
    pieces = list(stream(model, prompt, 7, GREEDY))
    assert len(pieces) == 7 and all(p.shape == (1, 1) for p in pieces)
    assert torch.equal(torch.cat([prompt, *pieces], 1), generate(model, prompt, 7, GREEDY))


def periodic_model(depth: int) -> tuple[Transformer, torch.Tensor]:
    """A tiny MLA+MoE+MTP model trained until it (and its MTP modules) predict a repeating sequence."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=16, dim=32, n_layers=2, n_heads=2, max_seq_len=96, mtp_depth=depth,
                                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                  inter_dim=64, n_routed_experts=4, moe_inter_dim=16)
    model = Transformer(cfg)
    period = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(120):
        offsets = torch.randint(0, len(period), (8,))
        seq = torch.stack([period.roll(-int(o)).repeat(4)[:33 + depth] for o in offsets])
        loss = model(seq[:, :32], seq[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval(), period


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_decoding_reproduces_greedy_and_accepts_drafts(depth):
    model, period = periodic_model(depth)
    prompt = period[:5][None]
    expected = generate(model, prompt, 60, GREEDY)
    tokens, stats = speculative_generate(model, prompt, 60)
    assert torch.equal(tokens, expected)
    assert stats.acceptance_rate > 0.5 and stats.tokens_per_pass > 1.4
    assert stats.rounds < 60  # fewer main-model passes than tokens


def test_speculative_decoding_is_exact_even_when_drafts_are_wrong():
    model = tiny("tiny", mtp_depth=2)  # untrained: drafts are mostly rejected
    prompt = torch.randint(0, VOCAB, (1, 6))
    tokens, stats = speculative_generate(model, prompt, 40)
    assert torch.equal(tokens, generate(model, prompt, 40, GREEDY))
    assert stats.drafted > 0


def full_sequence_drafts(model, tokens: list[int], n: int, n_drafts: int) -> list[int]:
    """Reference drafts for position n: the main model and every MTP module run over t_0..t_{n-1} from
    scratch (no caches), each module fed the tokens k ahead, its own earlier drafts included."""
    ext = list(tokens[:n + 1])
    hidden = model(torch.tensor([ext[:n]])).hidden  # [1, n, dim]
    drafts = []
    for k, module in enumerate(model.mtp[:n_drafts], start=1):
        hidden, normed = module(hidden, model.embed(torch.tensor([ext[k:n + k]])))
        drafts.append(int(model.head(normed[:, -1]).argmax(-1)))
        ext.append(drafts[-1])
    return drafts


def test_incremental_drafts_equal_drafts_from_the_full_sequence(monkeypatch):
    """The MTP caches and the partly-final hidden states must give the drafts a from-scratch pass gives;
    the output alone cannot show it, since verification corrects any wrong draft."""
    import nanoseek.speculative as speculative

    model = tiny("tiny", mtp_depth=3)
    rounds = []
    draft = speculative._draft

    def recording_draft(model_, hidden, filled, mtp_caches, tokens, n, n_drafts, device):
        drafts = draft(model_, hidden, filled, mtp_caches, tokens, n, n_drafts, device)
        rounds.append((list(tokens), n, n_drafts, drafts))
        return drafts

    monkeypatch.setattr(speculative, "_draft", recording_draft)
    speculative_generate(model, torch.randint(0, VOCAB, (1, 6)), 30)
    assert len(rounds) > 5
    for tokens, n, n_drafts, drafts in rounds:
        assert drafts == full_sequence_drafts(model, tokens, n, n_drafts), n


def test_speculative_decoding_refuses_models_without_mtp_modules():
    with pytest.raises(ValueError, match="MTP"):
        speculative_generate(tiny("tiny-gqa"), torch.zeros(1, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(tiny("tiny"), torch.zeros(2, 3, dtype=torch.long), 5)


def test_zero_new_tokens_returns_the_prompt_and_a_negative_count_is_refused():
    model = tiny("tiny")
    prompt = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(generate(model, prompt, 0, GREEDY), prompt)
    tokens, stats = speculative_generate(model, prompt, 0)  # was one token: greedy's output must be matched
    assert torch.equal(tokens, prompt) and stats.rounds == 0
    with pytest.raises(ValueError, match="max_new_tokens=-3"):
        generate(model, prompt, -3, GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens=-3"):
        speculative_generate(model, prompt, -3)
