"""Dense (Llama-style GQA) -> MLA + DeepSeekMoE conversion, and healing the result by distillation.

    convert.py  convert_to_mla_moe: calibration pass, new config, weights layer by layer, report
    mla.py      the attention surgery (RoPE pairs, shared rope key, latent projections)
    moe.py      the MLP -> experts split (balanced k-means) or upcycling
    heal.py     compare (KL, perplexities, top-1) and heal (distil the original back in with the Trainer)
"""
