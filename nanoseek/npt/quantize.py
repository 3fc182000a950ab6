"""Quantised frozen base weights (bitsandbytes 4-bit NF4 or 8-bit), CUDA only, fp32 compute.

A quantised base must compute in fp32 (mixed precision on top of quantisation has produced NaNs in
earlier adapter training), so `Npt` refuses --quantize with --precision bf16/fp16, 4-bit layers are built with
compute_dtype=float32, and every quantised layer is fed and returns fp32 (8-bit layers run
bitsandbytes' int8 matmul inside). Only the frozen MLP and GQA attention projections of model.layers
are quantised (MLA attention reads its weights directly and stays as it is); embeddings, norms, the
head and the adapters stay in fp32.

Not exercised by the CPU test suite (bitsandbytes kernels need CUDA); tests/test_npt.py checks only
that the combination is refused where it cannot run.

A quantised layer is held outside the module tree (see FrozenQuantizedLinear), so it is not in the
student's state dict: checkpoints and rollback snapshots hold only the fp32 parts and the adapters,
and the quantised weights are rebuilt from --base (on --resume too). Such a run is generated from with
`attach_adapters(base, RUN/adapters)`, not from its checkpoints alone.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from nanoseek.model.attention import MLAttention
from nanoseek.model.npt import NPTAdapter

MODES = ("none", "4bit", "8bit")


def check_quantization(mode: str, device: torch.device) -> None:
    """Raise a one-line ValueError unless `mode` can run here (CUDA and bitsandbytes)."""
    if mode == "none":
        return
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: must be one of {', '.join(MODES)}")
    if device.type != "cuda":
        raise ValueError(f"--quantize {mode} needs a CUDA GPU (bitsandbytes kernels), but the device is "
                         f"{device.type}; drop --quantize to train over the fp32 base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--quantize {mode} needs bitsandbytes: pip install bitsandbytes (or drop --quantize)")


class FrozenQuantizedLinear(nn.Module):
    """A frozen bitsandbytes linear [*, in] -> [*, out], kept out of parameters() and state_dict()."""

    def __init__(self, quantized: nn.Module, in_features: int, out_features: int):
        super().__init__()
        object.__setattr__(self, "quantized", quantized)  # not registered: no state dict entry, no .to() move
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x.float()).float()


def _quantized_copy(linear: nn.Linear, mode: str, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.detach().float().cpu()
    if mode == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to(device)  # bitsandbytes quantises on the move to the GPU


def quantize_base(model: nn.Module, mode: str, device: torch.device) -> int:
    """Replace the frozen nn.Linear projections inside model.layers (not the adapters) with quantised
    copies on `device`; returns how many were replaced."""
    check_quantization(mode, device)
    if mode == "none":
        return 0
    targets = []
    for block in model.layers:
        for owner in block.modules():
            # MLA reads its projection weights directly (absorbed decoding, QK-clip): it stays unquantised.
            if isinstance(owner, (NPTAdapter, MLAttention)):
                continue
            for name, child in owner.named_children():
                if isinstance(child, nn.Linear) and not child.weight.requires_grad and child.bias is None:
                    targets.append((owner, name, child))
    for owner, name, child in targets:
        setattr(owner, name, FrozenQuantizedLinear(_quantized_copy(child, mode, device), child.in_features,
                                                   child.out_features))
    return len(targets)
