"""NPT adapters: a frozen base model whose chosen layers' attention residual is replaced by a bounded,
attention-driven modulation of the MLP gate, trained against the base as teacher.

    (model/npt.py NPTAdapter, NPTBlock, gate_factor: what a converted block computes, and its bounds)
    config.py     AdapterConfig, --layers parsing
    convert.py    convert_to_npt (in place, weights shared), Teacher, adapter state helpers
    (train/objectives.py DistillationObjective: normalised hidden-state MSE + lambda * reg (+ KL))
    storage.py    save_adapters / load_adapters / attach_adapters (adapters alone, safetensors + JSON)
    base.py       load_base: a nanoseek run or a Hugging Face Llama folder
    quantize.py   bitsandbytes 4/8-bit frozen base (CUDA only, fp32 compute)
    cli.py        `nanoseek npt`
"""

from nanoseek.npt.config import AdapterConfig, parse_layers
from nanoseek.npt.convert import Teacher, adapter_state, adapters, convert_to_npt
from nanoseek.model.npt import NPTAdapter, NPTBlock, gate_factor
from nanoseek.train.objectives import DistillationObjective, normalised_mse
from nanoseek.npt.storage import attach_adapters, load_adapters, save_adapters

__all__ = ["AdapterConfig", "DistillationObjective", "NPTAdapter", "NPTBlock", "Teacher",
           "adapter_state", "adapters", "attach_adapters", "convert_to_npt", "gate_factor", "load_adapters",
           "normalised_mse", "parse_layers", "save_adapters"]
