"""Quantised frozen base weights (bitsandbytes 4-bit NF4 or 8-bit), CUDA only, fp32 compute.

Mixed precision over quantised weights has produced NaNs in adapter training, so `Npt` refuses --quantize with
bf16/fp16 and every quantised layer computes in fp32. Only the frozen MLP and GQA attention projections are
quantised; embeddings, norms, the head and the adapters stay fp32. A quantised layer is held outside the module
tree, so checkpoints hold only the fp32 parts and the adapters: the base is rebuilt from --base (on --resume too),
and such a run is generated from with `attach_adapters(base, RUN/adapters)`, not from its checkpoints alone."""

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
    # MLA reads its projection weights directly (absorbed decoding, QK-clip): it stays unquantised.
    targets = [(owner, name, child) for block in model.layers for owner in block.modules()
               if not isinstance(owner, (NPTAdapter, MLAttention))
               for name, child in owner.named_children()
               if isinstance(child, nn.Linear) and not child.weight.requires_grad and child.bias is None]
    for owner, name, child in targets:
        setattr(owner, name, FrozenQuantizedLinear(_quantized_copy(child, mode, device), child.in_features,
                                                   child.out_features))
    return len(targets)
