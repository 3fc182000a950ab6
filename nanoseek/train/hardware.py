"""The device to run on (`resolve_device`) and `--hardware auto`: the training precision for it.

`choose_precision` is a pure function of what can be read off the device, so it is tested with made-up devices;
`detect` reads the real one. Each choice carries its reason (Hopper's fp8 tensor cores double its dense peak)."""

import dataclasses
import functools
import importlib.util

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" | "cpu" | "cuda" -> the torch.device to run on (auto: cuda when a GPU is visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use --device cpu (or auto)")
    return torch.device(name)


@dataclasses.dataclass(frozen=True)
class HardwareChoice:
    precision: str  # "fp32" | "bf16" | "fp16"
    fp8: bool
    reason: str  # one line for the console


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, the units behind oneDNN's fast bf16 matmuls (torch's own probe)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def choose_precision(device_name: str | None, capability: tuple[int, int] | None,
                     torchao_available: bool, cpu_amx: bool = False) -> HardwareChoice:
    """device_name: the CUDA device's, None for the CPU."""
    if device_name is None:
        if cpu_amx:
            return HardwareChoice("bf16", False, "CPU with AMX: bf16 autocast (AMX bf16 matmuls are 3-5x "
                                  "fp32's; norms and the loss stay fp32)")
        return HardwareChoice("fp32", False, "no CUDA GPU and no AMX on this CPU: fp32 (bf16 matmuls would be "
                              "slower here)")
    name = device_name.upper()
    sm = f"sm_{capability[0]}{capability[1]}" if capability else "unknown capability"
    if "H100" in name or "H200" in name or capability == (9, 0):  # sm_90 is Hopper: H100, H200, GH200, H20
        if torchao_available:
            return HardwareChoice("bf16", True, f"{device_name} ({sm}): bf16 autocast + torchao fp8 linears "
                                  "(MLA projections, router and head stay bf16)")
        return HardwareChoice("bf16", False, f"{device_name} ({sm}): bf16 autocast; fp8 would need torchao "
                              "(pip install 'nanoseek[fp8]')")
    if "A100" in name:
        return HardwareChoice("bf16", False, f"{device_name} ({sm}): bf16 autocast (no loss scaling needed)")
    if "4090" in name:
        return HardwareChoice("bf16", False, f"{device_name} ({sm}): bf16 autocast")
    hint = "; bf16 also runs here (sm >= 80): --train.precision bf16" if capability and capability >= (8, 0) else ""
    return HardwareChoice("fp16", False, f"{device_name} ({sm}): fp16 autocast with a GradScaler "
                          f"(no tested recipe for this GPU; fp16 runs on every CUDA GPU since Volta{hint})")


def detect(device: torch.device) -> HardwareChoice:
    if device.type != "cuda":
        return choose_precision(None, None, False, cpu_amx=device.type == "cpu" and cpu_has_amx())
    return choose_precision(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                            importlib.util.find_spec("torchao") is not None)


def apply_hardware(cfg, device: torch.device):
    """cfg (a RunConfig) with train.precision and train.fp8 set for `device`; returns (cfg, choice)."""
    choice = detect(device)
    train = dataclasses.replace(cfg.train, precision=choice.precision, fp8=choice.fp8)
    return dataclasses.replace(cfg, train=train), choice
