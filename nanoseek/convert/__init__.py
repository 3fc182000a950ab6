"""Dense (Llama-style GQA) -> MLA + DeepSeekMoE conversion (convert.py; attention surgery in rorope.py and mla.py,
the MLP -> experts split in moe.py), and healing the result by distillation (heal.py)."""
