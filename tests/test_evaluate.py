"""`nanoseek eval`'s numbers against a direct computation, and `nanoseek check` over the presets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.check import check_config, check_presets, tiny_variant
from nanoseek.data import train_tokenizer
from nanoseek.evaluate import evaluate_ids, token_stream

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture(scope="module")
def char_model():
    tok = train_tokenizer("char", [TEXT], 0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-gqa", vocab_size=tok.vocab_size, max_seq_len=32)).eval()
    return model, tok


def test_loss_perplexity_and_bits_per_byte_match_a_direct_computation(char_model, tmp_path):
    model, tok = char_model
    path = tmp_path / "held_out.txt"
    path.write_text(TEXT)
    ids = token_stream(str(path), tok)
    assert ids[-1] == tok.eos_id and len(ids) == len(TEXT) + 1  # one document, ended by eos
    result = evaluate_ids(model, tok, ids, seq_len=32, batch_size=4)
    # Reference: every token after the first, scored in consecutive windows of 32, one window at a time.
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):
            window = torch.from_numpy(ids[start:start + 33]).long()[None]
            logits = model(window[:, :-1]).logits[0]
            nats += float(F.cross_entropy(logits.double(), window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    assert result.tokens == count == len(ids) - 1
    assert result.loss == pytest.approx(nats / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert result.bytes == len(TEXT) - 1  # ASCII: one byte per character; the first is never a target
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / (len(TEXT) - 1), rel=1e-5)


def test_eval_refuses_ids_outside_the_vocabulary(char_model):
    model, tok = char_model
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate_ids(model, tok, np.array([0, 1, model.config.vocab_size + 3]))


@pytest.mark.parametrize("sizes", [dict(batch_size=0), dict(seq_len=0), dict(seq_len=-4)])
def test_eval_refuses_empty_windows_or_batches(char_model, sizes):
    model, tok = char_model
    with pytest.raises(ValueError, match="must be >= 1"):  # was a ZeroDivisionError, or 0 silently the default
        evaluate_ids(model, tok, np.array([0, 1, 2, 3]), **sizes)


def test_every_preset_passes_the_check():
    results = check_presets()
    assert [r.preset for r in results if not r.ok] == []
    assert all(r.params > 0 for r in results)


def test_tiny_variant_keeps_each_presets_structure():
    for name in ("tiny", "tiny-gqa", "medium", "large", "smoldeepseek-135m"):
        full, small = ModelConfig.from_preset(name), tiny_variant(ModelConfig.from_preset(name))
        assert small.dim < full.dim or full.dim <= 64
        for field in ("attention", "mtp_depth", "mtp_kind", "tie_embeddings", "score_func", "n_expert_groups"):
            assert getattr(small, field) == getattr(full, field), (name, field)
        assert bool(small.q_lora_rank) == bool(full.q_lora_rank)
        assert bool(small.n_routed_experts) == bool(full.n_routed_experts)


def test_the_check_reports_a_model_that_produces_nan():
    cfg = tiny_variant(ModelConfig.from_preset("tiny"))
    broken = Transformer(cfg)

    class NaNModel(Transformer):
        def __init__(self, config):
            super().__init__(config)
            self.load_state_dict(broken.state_dict())
            with torch.no_grad():
                self.layers[0].attn.wo.weight[0, 0] = float("nan")

    import nanoseek.check as check

    original = check.Transformer
    check.Transformer = NaNModel
    try:
        result = check_config("broken", cfg)
    finally:
        check.Transformer = original
    assert not result.ok and "forward" in result.detail


def test_the_check_names_the_first_token_that_is_not_the_full_forwards_choice():
    from nanoseek.check import _cache_mismatch
    from nanoseek.generate import GREEDY, generate

    torch.manual_seed(0)
    model = Transformer(tiny_variant(ModelConfig.from_preset("tiny-gqa"))).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 8))
    tokens = generate(model, prompt, 6, GREEDY)
    assert _cache_mismatch(model, tokens, 8) is None
    with torch.no_grad():
        logits = model(tokens).logits[0, 8 + 2]  # predicts new token 3 (index 3 after the prompt)
    wrong = tokens.clone()
    wrong[0, 8 + 3] = int(logits.argmin())  # the least likely token: far from any near-tie
    assert _cache_mismatch(model, wrong, 8) == 3
