"""NPT adapters: a frozen base model whose chosen layers' attention residual becomes a bounded, attention-driven
modulation of the MLP gate (model/npt.py), distilled from the base as teacher (train/objectives.py)."""

from nanoseek.model.npt import NPTAdapter, NPTBlock, gate_factor
from nanoseek.npt.config import AdapterConfig, parse_layers
from nanoseek.npt.convert import Teacher, adapter_state, adapters, convert_to_npt
from nanoseek.npt.storage import attach_adapters, load_adapters, save_adapters
from nanoseek.train.objectives import DistillationObjective, normalised_mse

__all__ = ["AdapterConfig", "DistillationObjective", "NPTAdapter", "NPTBlock", "Teacher",
           "adapter_state", "adapters", "attach_adapters", "convert_to_npt", "gate_factor", "load_adapters",
           "normalised_mse", "parse_layers", "save_adapters"]
