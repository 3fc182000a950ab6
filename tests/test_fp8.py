"""Precision by module for fp8: which linears may go to fp8, and a clear refusal where it cannot run."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer, TrainConfig
from nanoseek.train.fp8 import enable_fp8, fp8_eligible


def test_mla_projections_router_and_head_stay_high_precision():
    model = Transformer(ModelConfig.from_preset("tiny", q_lora_rank=32))
    eligible = {name for name, module in model.named_modules() if fp8_eligible(module, name)}
    assert "layers.0.attn.wo" in eligible and "layers.0.ffn.w1" in eligible
    for name in ("layers.0.attn.wq_a", "layers.0.attn.wq_b", "layers.0.attn.wkv_a", "layers.0.attn.wkv_b", "head",
                 "mtp.0.eh_proj"):
        assert name not in eligible, name
    assert not any(name.endswith("gate") for name in eligible)


def test_unaligned_linears_are_not_eligible():
    assert not fp8_eligible(torch.nn.Linear(24, 40), "layers.0.ffn.w1")
    assert fp8_eligible(torch.nn.Linear(32, 48), "layers.0.ffn.w1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_refuses_clearly_without_a_capable_gpu():
    with pytest.raises(ValueError, match="compute capability"):
        enable_fp8(Transformer(ModelConfig.from_preset("tiny-dense")), torch.device("cpu"))


def test_fp8_needs_bf16():
    with pytest.raises(ValueError, match="fp8"):
        TrainConfig(fp8=True, precision="fp32")
