"""Fast generation: static caches equal dynamic ones, ragged batches equal their prompts decoded alone,
packed weights equal plain linears, and bf16 decoding stays within a stated distance of fp32."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.generate import GREEDY, StaticDecoder, generate, generate_batch, pad_prompts
from nanoseek.model.cache import SlotLayout, new_static_caches
from nanoseek.model.layers import MLP
from nanoseek.model.packed import PackedLinear, can_pack, fuse_linears, pack_linears
from tiny import ARCHITECTURES

VOCAB = 97
PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 60, 7, 33], [8], [21, 22, 23, 24, 25]]


def tiny(arch: str, dtype=torch.float64) -> Transformer:
    preset, overrides = ARCHITECTURES[arch]
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=VOCAB, max_seq_len=64, **overrides)
    return Transformer(cfg).to(dtype).eval()  # float64: no argmax flips from rounding-order ties


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_static_cache_logits_equal_dynamic_cache_logits(arch):
    model = tiny(arch)
    prompt = torch.tensor([PROMPTS[1]])
    decoder = StaticDecoder(model, 1, 30)
    dynamic = model.new_caches(1, 30)
    with torch.no_grad():
        got, want = decoder.prefill(prompt), model(prompt, caches=dynamic).logits[:, -1]
        for pos in range(prompt.shape[1], 29):
            assert torch.allclose(got, want, atol=1e-10, rtol=0), f"position {pos}"
            nxt = want.argmax(-1, keepdim=True)
            got, want = decoder.step(nxt, pos), model(nxt, caches=dynamic, start_pos=pos).logits[:, -1]
    assert torch.equal(generate(model, prompt, 25, GREEDY), generate(model, prompt, 25, GREEDY, static_cache=False))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_ragged_batch_equals_each_prompt_decoded_alone(arch):
    model = tiny(arch)
    rows = generate_batch(model, PROMPTS, 20, GREEDY)
    for prompt, row in zip(PROMPTS, rows):
        alone = generate(model, torch.tensor([prompt]), 20, GREEDY, static_cache=False)[0, len(prompt):]
        assert row == alone.tolist()


def test_ragged_prefill_logits_match_alone_and_padding_never_leaks():
    model = tiny("gqa")
    batch, pad = pad_prompts(PROMPTS, pad_id=0)
    assert pad.tolist() == [4, 0, 6, 2] and batch.shape == (4, 7)
    other = batch.masked_fill(torch.arange(7)[None, :] < pad[:, None], 55)  # another pad token
    with torch.no_grad():
        logits = []
        for tokens in (batch, other):
            layout, caches = new_static_caches(model, 4, 10, pad)
            layout.advance(0, 7)
            logits.append(model(tokens, caches=caches).logits[:, -1])
        for i, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0, -1]
            assert torch.allclose(logits[0][i], alone, atol=1e-10, rtol=0)
    assert torch.equal(logits[0], logits[1])


def test_slot_layout_positions_and_mask():
    layout = SlotLayout(2, 5, torch.tensor([0, 2]))
    layout.advance(0, 3)
    assert layout.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert layout.mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]
    layout.advance(torch.tensor(3), 1)
    assert layout.positions.tolist() == [[3], [1]]
    assert layout.mask[:, 0, 0].int().tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 0]]
    with pytest.raises(ValueError, match="does not fit"):
        layout.advance(4, 2)


def test_ragged_batch_refuses_dynamic_cache_and_empty_prompts():
    model = tiny("gqa")
    batch, pad = pad_prompts(PROMPTS)
    with pytest.raises(ValueError, match="static cache"):
        generate(model, batch, 3, GREEDY, pad=pad, static_cache=False)
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1, 2], []])


def test_ragged_batch_with_eos_and_truncation():
    model = tiny("mla")
    first = generate(model, torch.tensor([PROMPTS[2]]), 1, GREEDY)[0, -1].item()
    rows = generate_batch(model, PROMPTS, 12, GREEDY, eos_id=first)
    assert rows[2] == [first]  # that row stops at once, the others run on
    for prompt, row in zip(PROMPTS, rows):
        assert row == generate(model, torch.tensor([prompt]), 12, GREEDY, eos_id=first)[0, len(prompt):].tolist()
    long = [list(range(1, 70)), [3, 4]]  # 69 tokens: past max_seq_len - 1 = 63
    rows = generate_batch(model, long, 5, GREEDY, truncate=True)
    assert rows[0] == generate(model, torch.tensor([long[0][-63:]]), 5, GREEDY)[0, 63:].tolist()
    # The rows share one context: after a 63-token row, every row has room for one new token.
    assert rows[1] == generate(model, torch.tensor([long[1]]), 5, GREEDY)[0, 2:3].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_linear(dtype):
    if not can_pack(dtype, "cpu"):
        pytest.skip(f"no oneDNN prepacking for {dtype} on this CPU")
    torch.manual_seed(0)
    weight, x = torch.randn(48, 40).to(dtype), torch.randn(3, 5, 40).to(dtype)
    got, want = PackedLinear(weight)(x).float(), F.linear(x, weight).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (3, 5, 48) and torch.allclose(got, want, atol=tol * want.abs().max(), rtol=0)


def test_packed_model_decodes_the_same_tokens():
    model = tiny("gqa", torch.float32)
    prompt = torch.tensor([PROMPTS[1]])
    expected = generate(model, prompt, 20, GREEDY)
    if pack_linears(model) == 0:
        pytest.skip("no oneDNN prepacking here")
    assert isinstance(model.head, PackedLinear)
    assert torch.equal(generate(model, prompt, 20, GREEDY), expected)



@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fused_projections_give_the_same_logits_and_tokens(arch):
    """prepare_for_generation stacks GQA's wq/wk/wv and every SwiGLU's w1/w3 into one packed linear each."""
    model = tiny(arch, torch.float32)
    prompt = torch.tensor([PROMPTS[1]])
    expected, want = generate(model, prompt, 20, GREEDY), model(torch.tensor([PROMPTS[0]])).logits
    if not can_pack(torch.float32, "cpu"):
        pytest.skip("no oneDNN prepacking here")
    fused = fuse_linears(model)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert fused == len(mlps) + (model.config.n_layers if arch == "gqa" else 0) and mlps
    assert all(m.w1 is None and isinstance(m.w13, PackedLinear) for m in mlps)
    pack_linears(model)
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([PROMPTS[0]])).logits, want, atol=1e-5 * want.abs().max(), rtol=0)
    assert torch.equal(generate(model, prompt, 20, GREEDY), expected)


# bf16 against fp32, greedy, on the tiny GQA and MLA models: teacher-forced on fp32's own greedy tokens,
# the bf16 logits stay within BF16_LOGIT_TOL of fp32's (relative to fp32's largest |logit|), and every token
# bf16 decoding picks has an fp32 logit within BF16_GAP_TOL of the fp32 maximum (a near-tie, not an error).
BF16_LOGIT_TOL = 0.03  # measured: 0.008 on both models
BF16_GAP_TOL = 0.03  # measured: 0 (bf16 picked the fp32 tokens)


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_bf16_generation_within_tolerance_of_fp32(arch):
    full = tiny(arch, torch.float32)
    half = tiny(arch, torch.bfloat16)
    pack_linears(half)  # the fast path, where this CPU has it
    prompt = torch.tensor([PROMPTS[1]])
    reference = generate(full, prompt, 30, GREEDY)
    decoded = generate(half, prompt, 30, GREEDY)
    with torch.no_grad():
        want = full(reference).logits[0].float()
        got = half(reference).logits[0].float()
        scale = want.abs().max()
        assert (got - want).abs().max() <= BF16_LOGIT_TOL * scale
        fp32_on_bf16 = full(decoded).logits[0, prompt.shape[1] - 1:-1].float()  # scores of bf16's choices
        picked = fp32_on_bf16.gather(1, decoded[0, prompt.shape[1]:, None]).squeeze(1)
        assert (fp32_on_bf16.max(-1).values - picked).max() <= BF16_GAP_TOL * scale


@pytest.mark.parametrize("arch", ["gqa", "mla-qlora"])
def test_decode_step_traces_without_graph_breaks(arch):
    from nanoseek.generate import decode_step

    model = tiny(arch, torch.float32)
    layout, caches = new_static_caches(model, 2, 16, torch.tensor([0, 3]))
    explained = torch._dynamo.explain(decode_step)(model, layout, caches, torch.tensor([[3], [4]]), torch.tensor(7))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow
def test_compiled_decoding_equals_eager():
    model = tiny("gqa", torch.float32)
    prompt, pad = pad_prompts(PROMPTS[:2])
    eager = generate(model, prompt, 12, GREEDY, pad=pad)
    assert torch.equal(generate(model, prompt, 12, GREEDY, pad=pad, compile=True), eager)
