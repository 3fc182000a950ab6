"""Float8 training by module (torchao), with the fragile layers kept in high precision.

The MLA projections (their low-rank latents feed every head's keys and values), the router and the output head
(DeepSeek-V3, arXiv 2412.19437 section 3.3.1, keeps both in high precision) stay in bf16/fp32, as do layers whose
dims are not multiples of 16 (an fp8 GEMM requirement). Real fp8 matmuls need CUDA compute capability >= 8.9."""

import torch
from torch import nn

# named_modules() suffixes kept out of fp8.
HIGH_PRECISION = ("attn.wq", "attn.wq_a", "attn.wq_b", "attn.wkv_a", "attn.wkv_b", "gate", "head", "eh_proj")


def fp8_eligible(module: nn.Module, name: str) -> bool:
    return (isinstance(module, nn.Linear) and not name.endswith(HIGH_PRECISION)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def enable_fp8(model: nn.Module, device: torch.device, recipe: str = "tensorwise") -> list[str]:
    """Swap eligible linears for torchao Float8Linear in place; returns their names."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("train.fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
                         "use --train.precision bf16 on this device")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ValueError("train.fp8 needs torchao: pip install 'nanoseek[fp8]'") from None
    converted = [name for name, module in model.named_modules() if fp8_eligible(module, name)]
    convert_to_float8_training(model, module_filter_fn=fp8_eligible, config=Float8LinearConfig.from_recipe_name(recipe))
    return converted
