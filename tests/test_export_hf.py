"""Hugging Face export: the exported folder, loaded by transformers' own model classes, gives nanoseek's logits.

The reference is transformers itself (DeepseekV3, DeepseekV2, Llama, Qwen3), in fp32 with eager attention and
eager experts. Weights are re-drawn at unit scale (init_std 0.02 makes attention nearly uniform, which would
hide a RoPE layout error) and norm weights and balance biases perturbed, so a wrong name map shows up.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

from hf_reference import gqa_config, max_logit_diff
from nanoseek import ModelConfig, Transformer
from nanoseek.interop import export_hf, from_hf_name, halves_to_interleaved, interleaved_to_halves

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

VOCAB = 97
TOL = 1e-4


def mla(**overrides) -> ModelConfig:
    # Odd head dims on purpose: nothing may assume powers of two.
    base = dict(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=2, max_seq_len=32, attention="mla",
                kv_lora_rank=16, qk_nope_head_dim=13, qk_rope_head_dim=6, v_head_dim=17, inter_dim=40,
                n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=12,
                n_dense_layers=1, mtp_depth=1)
    base.update(overrides)
    return ModelConfig(**base)


gqa = functools.partial(gqa_config, vocab_size=VOCAB)


# softmax (DeepseekV2) cases use even qk_nope_head_dim: transformers' V2 RoPE needs even strides in fp32.
CASES = {
    "v3-moe": (mla(), "deepseek_v3"),
    "v3-qlora-dense0-shared2-tied": (mla(q_lora_rank=8, n_dense_layers=0, n_shared_experts=2, tie_embeddings=True),
                                     "deepseek_v3"),
    "v3-dense2-noshared-scale": (mla(n_dense_layers=2, n_shared_experts=0, route_scale=2.5), "deepseek_v3"),
    "v3-groups": (mla(n_routed_experts=6, n_expert_groups=2, n_limited_groups=1, q_lora_rank=8, route_scale=1.5),
                  "deepseek_v3"),
    "v3-dense-mla": (mla(n_routed_experts=0, tie_embeddings=True), "deepseek_v3"),
    "v3-dense-mla-qlora": (mla(n_routed_experts=0, q_lora_rank=8, mtp_depth=0), "deepseek_v3"),
    "v2-softmax": (mla(score_func="softmax", qk_nope_head_dim=14), "deepseek_v2"),
    "v2-softmax-groups-qlora-noshared": (mla(score_func="softmax", qk_nope_head_dim=14, n_routed_experts=6,
                                             n_expert_groups=2, n_limited_groups=1, q_lora_rank=6,
                                             n_shared_experts=0, n_dense_layers=0, route_scale=2.0), "deepseek_v2"),
    "llama-mha": (gqa(n_kv_heads=4), "llama"),
    "llama-gqa-tied": (gqa(tie_embeddings=True), "llama"),
    "llama-mqa-headdim": (gqa(n_kv_heads=1, head_dim=10), "llama"),
    "qwen3-qknorm": (gqa(qk_norm=True, n_kv_heads=2), "qwen3"),
    "preset-tiny": (ModelConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=32), "deepseek_v3"),
    "preset-tiny-dense": (ModelConfig.from_preset("tiny-dense", vocab_size=VOCAB, max_seq_len=32), "deepseek_v3"),
    "preset-tiny-gqa": (ModelConfig.from_preset("tiny-gqa", vocab_size=VOCAB, max_seq_len=32), "llama"),
}

ROPE_CASES = {
    "mla-linear": mla(rope_scaling="linear", rope_factor=4.0),
    "mla-yarn": mla(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=8, mscale=0.707,
                    mscale_all_dim=0.707, rope_theta=500.0),
    # mscale_all_dim=0 with mscale != 1: transformers would infer a different attention factor than DeepSeek's.
    "mla-yarn-mscale-only": mla(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=8, mscale=0.7,
                                mscale_all_dim=0.0, rope_theta=500.0),
    "mla-yarn-softmax": mla(rope_scaling="yarn", rope_factor=2.0, rope_original_max_seq_len=16, mscale=1.0,
                            mscale_all_dim=1.0, score_func="softmax", qk_nope_head_dim=14),
    "gqa-linear": gqa(rope_scaling="linear", rope_factor=2.0),
    # nanoseek's mscale_all_dim^2 on the GQA softmax scale is folded into Llama's attention factor.
    "gqa-yarn": gqa(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=8, mscale=0.8,
                    mscale_all_dim=1.0, rope_theta=500.0),
}


# ---- helpers ---------------------------------------------------------------------------------------


@torch.no_grad()
def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with unit-scale weights, perturbed norms and (sigmoid routing) random balance biases."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim == 1:  # RMSNorm weights
            param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    for moe_name, moe in model.moe_layers():
        bias = moe.gate.balance_bias
        if cfg.score_func == "sigmoid":
            bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
        else:  # DeepseekV2 has no bias; a uniform one selects the same experts, so it exports
            bias.fill_(0.25)
    return model


def load_hf(path):
    kwargs = dict(attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["experts_implementation"] = "eager"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return hf.eval(), info


def saved_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


# ---- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    cfg, model_type = CASES[case]
    model = build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact export warns about nothing
        out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    hf, info = load_hf(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == config["architectures"][0]
    assert max_logit_diff(model, hf) < TOL


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_matches_transformers(case, tmp_path):
    model = build(ROPE_CASES[case])
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    kind = model.config.rope_scaling
    assert config["rope_parameters"]["rope_type"] == kind == config["rope_scaling"]["rope_type"]
    assert config["rope_scaling"]["factor"] == config["rope_parameters"]["factor"] == model.config.rope_factor
    hf, _ = load_hf(out)
    assert max_logit_diff(model, hf, seq_len=32) < TOL  # past the yarn original length of 8 / 16


def test_rope_layout_error_would_show(tmp_path):
    """Negative control: the same export read with rotate-half RoPE (rope_interleave false) must not match."""
    model = build(mla(n_routed_experts=0))
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config["rope_interleave"] = False
    (out / "config.json").write_text(json.dumps(config))
    hf, _ = load_hf(out)
    assert max_logit_diff(model, hf) > 1e-2


# ---- files and config ------------------------------------------------------------------------------


def test_deepseek_v3_config_and_keys(tmp_path):
    cfg = mla(n_routed_experts=6, n_expert_groups=2, n_limited_groups=1, route_scale=2.5, rope_theta=50000.0,
              q_lora_rank=0)
    model = build(cfg)
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 50000.0 and config["rope_scaling"] is None
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert config["scoring_func"] == "sigmoid" and config["topk_method"] == "noaux_tc"
    assert config["rope_interleave"] is True and config["norm_topk_prob"] is True
    assert config["num_key_value_heads"] == config["num_attention_heads"] == cfg.n_heads
    assert config["q_lora_rank"] is None
    assert config["first_k_dense_replace"] == cfg.n_dense_layers
    assert config["routed_scaling_factor"] == 2.5
    assert (config["n_group"], config["topk_group"]) == (2, 1)
    assert config["num_nextn_predict_layers"] == 0
    assert config["rms_norm_eps"] == cfg.norm_eps and config["tie_word_embeddings"] is False

    tensors = saved_tensors(out)
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        prefix = f"model.layers.{i}.mlp"
        bias = tensors[f"{prefix}.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32
        assert torch.equal(bias, model.layers[i].ffn.gate.balance_bias)
        for j in range(cfg.n_routed_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"{prefix}.experts.{j}.{proj}.weight" in tensors
        assert torch.equal(tensors[f"{prefix}.experts.3.down_proj.weight"], model.layers[i].ffn.experts.w2[3])
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in tensors)  # no fused keys
    assert not any(k.startswith(f"model.layers.{cfg.n_layers}.") or "mtp" in k for k in tensors)  # no MTP
    assert "lm_head.weight" in tensors


def test_names_map_back(tmp_path):
    """Every exported tensor maps back to the nanoseek tensor (or expert slice, or RoPE-reordered rows) it came from."""
    for cfg in (mla(q_lora_rank=8), gqa(qk_norm=True)):
        model = build(cfg)
        out = export_hf(model, tmp_path / cfg.attention)
        model_type = json.loads((out / "config.json").read_text())["model_type"]
        ours = model.state_dict()
        for hf_name, tensor in saved_tensors(out).items():
            mapped = from_hf_name(hf_name, model_type)
            assert mapped is not None, hf_name
            name, expert = mapped
            source = ours[name] if expert is None else ours[name][expert]
            if cfg.attention == "gqa" and name.endswith(("wq.weight", "wk.weight", "_norm.weight")) \
                    and ".attn." in name:
                tensor = halves_to_interleaved(tensor, cfg.head_dim)
            assert torch.equal(tensor, source), hf_name


def test_rope_permutations_are_inverse():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(w, 8), 8), w)
    assert interleaved_to_halves(torch.arange(8.0), 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_tied_model_omits_lm_head(tmp_path):
    out = export_hf(build(mla(tie_embeddings=True)), tmp_path / "hf")
    assert "lm_head.weight" not in saved_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_bf16_export_and_shards(tmp_path):
    model = build(mla())
    out = export_hf(model, tmp_path / "hf", dtype="bf16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = saved_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    hf, _ = load_hf(out)  # fp32 load of bf16 weights: compare with nanoseek on the same rounded weights
    with torch.no_grad():
        for param in model.parameters():  # the balance bias is exported in fp32, so only weights are rounded
            param.copy_(param.to(torch.bfloat16))
    assert max_logit_diff(model, hf) < TOL
    # exporting again unsharded removes the old shards
    export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


# ---- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_files(tmp_path):
    try:
        from nanoseek.data.tokenizer import ByteTokenizer
    except ImportError:
        pytest.skip("nanoseek.data has no ByteTokenizer")
    tok = ByteTokenizer()
    out = export_hf(build(gqa(vocab_size=260)), tmp_path / "hf", tokenizer=tok)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("héllo")["input_ids"] == tok.encode("héllo")


def test_tokenizer_without_hf_files_is_skipped(tmp_path):
    with pytest.warns(UserWarning, match="to_hf_files"):
        out = export_hf(build(gqa()), tmp_path / "hf", tokenizer=object())
    assert not (out / "tokenizer_config.json").exists()


def test_tokenizer_larger_than_model_is_refused(tmp_path):
    class Big:
        vocab_size = VOCAB + 1

        def to_hf_files(self, directory, model_max_length=None):
            raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(build(gqa()), tmp_path / "hf", tokenizer=Big())


# ---- refusals and warnings -------------------------------------------------------------------------


def test_gqa_moe_is_refused(tmp_path):
    cfg = gqa(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=8)
    with pytest.raises(ValueError, match="GQA attention with DeepSeek-style MoE"):
        export_hf(Transformer(cfg), tmp_path / "hf")


def test_softmax_with_balance_bias_is_refused(tmp_path):
    model = build(mla(score_func="softmax", qk_nope_head_dim=14))
    with torch.no_grad():
        model.layers[1].ffn.gate.balance_bias[0] += 0.01
    with pytest.raises(ValueError, match="no correction bias"):
        export_hf(model, tmp_path / "hf")


def test_llama_needs_dim_divisible_by_heads(tmp_path):
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        export_hf(Transformer(gqa(dim=30, head_dim=8)), tmp_path / "hf")


def test_inexact_settings_warn(tmp_path):
    with pytest.warns(UserWarning, match="latent norms"):
        export_hf(Transformer(mla(norm_eps=1e-5)), tmp_path / "a")
    with pytest.warns(UserWarning, match="stride divisible by 2"):
        export_hf(Transformer(mla(score_func="softmax", qk_nope_head_dim=13)), tmp_path / "b")
