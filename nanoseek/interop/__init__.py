"""Interoperability with Hugging Face transformers: export, import, and the name maps both read."""

from nanoseek.interop.export import export_hf, hf_config, hf_model_type, hf_state_dict
from nanoseek.interop.importer import import_hf, is_hf_folder, load_hf_tokenizer, model_config_from_hf
from nanoseek.interop.names import NAME_TABLES, from_hf_name, halves_to_interleaved, interleaved_to_halves, to_hf_name

__all__ = ["NAME_TABLES", "export_hf", "from_hf_name", "halves_to_interleaved", "hf_config", "hf_model_type",
           "hf_state_dict", "import_hf", "interleaved_to_halves", "is_hf_folder", "load_hf_tokenizer",
           "model_config_from_hf", "to_hf_name"]
