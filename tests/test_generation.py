"""Sampling with the KV cache equals sampling by recomputing the whole prefix."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.generate import generate, sample_next


def greedy_without_cache(model, prompt, n):
    tokens = prompt
    for _ in range(n):
        nxt = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_cached_greedy_equals_full_recompute(preset):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=97, max_seq_len=64)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        expected = greedy_without_cache(model, prompt, 12)
    assert torch.equal(generate(model, prompt, 12, temperature=0), expected)


def test_top_k_one_is_greedy_and_eos_stops():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1, keepdim=True))
    model = Transformer(ModelConfig.from_preset("tiny-gqa", vocab_size=31, max_seq_len=64)).eval()
    prompt = torch.randint(0, 31, (1, 4))
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 20, temperature=0, eos_id=first)
    assert out.shape[1] == 5  # stopped right after producing eos


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0, 0.7, gen).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: token 2 and 3 are never drawn
