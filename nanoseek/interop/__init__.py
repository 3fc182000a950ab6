"""Interoperability with Hugging Face transformers: export (and the name maps an import needs)."""

from nanoseek.interop.export import export_hf, hf_config, hf_model_type, hf_state_dict
from nanoseek.interop.names import NAME_TABLES, from_hf_name, halves_to_interleaved, interleaved_to_halves, to_hf_name

__all__ = ["NAME_TABLES", "export_hf", "from_hf_name", "halves_to_interleaved", "hf_config", "hf_model_type",
           "hf_state_dict", "interleaved_to_halves", "to_hf_name"]
