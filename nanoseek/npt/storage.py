"""Adapters on disk, apart from the base: DIR/adapters.safetensors (the adapter weights alone, under the student's
state-dict names) + DIR/adapter_config.json (the AdapterConfig and where the base came from)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.model import Transformer
from nanoseek.npt.config import AdapterConfig
from nanoseek.npt.convert import Teacher, adapter_state, convert_to_npt

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "nanoseek-npt-adapters"


def save_adapters(model: torch.nn.Module, out_dir: str | Path, base: str = "") -> Path:
    cfg = getattr(model, "npt_config", None)
    if cfg is None:
        raise ValueError("the model carries no NPT adapters; convert it with convert_to_npt first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter_state(model).items()}
    partial = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.replace(out_dir / WEIGHTS_FILE)  # a reader never sees a half-written file
    meta = {"format": FORMAT, **asdict(cfg), "base": str(base)}
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


def load_adapters(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[AdapterConfig, dict, dict]:
    """Read DIR -> (AdapterConfig, {name: tensor}, the JSON as written)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{str(path)!r} holds no adapters (needs {CONFIG_FILE} and {WEIGHTS_FILE}); pass the "
                         "adapters/ folder of an `nanoseek npt` run")
    try:
        meta = json.loads(config_path.read_text())
        state = load_file(str(weights_path), device=str(map_location))
    except (ValueError, OSError, SafetensorError) as err:
        raise ValueError(f"{str(path)!r}: corrupt adapter files ({type(err).__name__}); re-save them") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not an NPT adapter config (format={meta.get('format')!r})")
    cfg = AdapterConfig.from_dict({k: meta[k] for k in ("layers", "rank", "safe_mode") if k in meta})
    return cfg, state, meta


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a converted model; names and shapes must match exactly."""
    own = adapter_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ValueError(f"adapter tensor {name!r} is {'missing' if missing else 'unexpected'}; the adapters were "
                         "saved for a different layer set or mode (check adapter_config.json)")
    with torch.no_grad():
        for name, tensor in own.items():
            if tensor.shape != state[name].shape:
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(state[name].shape)}, the model needs "
                                 f"{tuple(tensor.shape)}; the adapters were trained on a different base")
            tensor.copy_(state[name])


def attach_adapters(base: Transformer, path: str | Path) -> tuple[Transformer, Teacher]:
    """Convert `base` in place with the adapters saved in DIR; returns (the NPT model, its Teacher)."""
    cfg, state, _ = load_adapters(path, map_location=base.embed.weight.device)
    teacher = convert_to_npt(base, cfg)
    load_adapter_state(base, state)
    return base, teacher
