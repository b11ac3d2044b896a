"""Tiny random transformers models for the interop tests (several layer schedules
per architecture), with every weight and buffer re-drawn so that a mapping
error cannot hide behind zeros, ones or identical experts."""

import numpy as np

V = 320  # >= the byte tokenizer's 259, so the converted config validates as is

_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
_DS_MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
               routed_scaling_factor=1.5)
_V4 = dict(head_dim=8, q_lora_rank=16, partial_rotary_factor=0.5, o_groups=2, o_lora_rank=8, index_n_heads=8,
           index_head_dim=8, **{k: v for k, v in _DS_MOE.items()})
_GQA = dict(num_attention_heads=4, num_key_value_heads=2)

# name -> (transformers config class name, kwargs, sequence length)
CASES = {
    # V3: a dense first layer, q-LoRA, group-limited routing, YaRN with mscale (MLA softmax scale).
    "deepseek_v3-dense_first": ("DeepseekV3Config", dict(
        num_hidden_layers=2, first_k_dense_replace=1, n_group=4, topk_group=2, intermediate_size=48,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 16},
        **_MLA, **_DS_MOE), 40),
    # V3: no q-LoRA, all layers MoE, rotate-half rope, tied embeddings.
    "deepseek_v3-no_q_lora": ("DeepseekV3Config", dict(
        num_hidden_layers=2, first_k_dense_replace=0, n_group=1, topk_group=1, rope_interleave=False,
        tie_word_embeddings=True, **dict(_MLA, q_lora_rank=None), **_DS_MOE), 24),
    # V3.2: the indexer keeps 16 of 64 keys (seq > top-k).
    "deepseek_v32-topk16": ("DeepseekV32Config", dict(
        num_hidden_layers=2, first_k_dense_replace=1, n_group=2, topk_group=1, intermediate_size=48, index_topk=16,
        index_head_dim=8, index_n_heads=8, **_MLA, **_DS_MOE), 64),
    "deepseek_v32-topk8_all_moe": ("DeepseekV32Config", dict(
        num_hidden_layers=2, first_k_dense_replace=0, n_group=1, topk_group=1, index_topk=8, index_head_dim=8, index_n_heads=8,
        **_MLA, **_DS_MOE), 40),
    # V4: hash layer, sliding / CSA / HCA, 300 tokens through windows of 8, CSA ratio 4 (top-8), HCA ratio 16.
    "deepseek_v4-swa_csa_hca": ("DeepseekV4Config", dict(
        num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"], sliding_window=8,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}, index_topk=8,
        swiglu_limit=0.5, **_V4), 300),
    # V4: CSA/HCA only, YaRN on the compressed rope, two hash layers, sigmoid-free sqrtsoftplus scores.
    "deepseek_v4-yarn_two_hash": ("DeepseekV4Config", dict(
        num_hidden_layers=3, mlp_layer_types=["hash_moe", "hash_moe", "moe"], sliding_window=5,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8}, index_topk=6,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        hc_mult=3, hc_sinkhorn_iters=7, **_V4), 96),
    "qwen3_moe-dense_first": ("Qwen3MoeConfig", dict(
        num_hidden_layers=2, mlp_only_layers=[0], intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, head_dim=16, **_GQA), 32),
    # Qwen3-MoE: renormalised top-k, sliding window on every layer, tied embeddings, MoE every 2nd layer.
    "qwen3_moe-sliding_norm": ("Qwen3MoeConfig", dict(
        num_hidden_layers=2, norm_topk_prob=True, use_sliding_window=True, sliding_window=6, decoder_sparse_step=2,
        tie_word_embeddings=True, intermediate_size=48, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **_GQA), 32),
    "mixtral-plain": ("MixtralConfig", dict(
        num_hidden_layers=2, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **_GQA), 32),
    "mixtral-sliding": ("MixtralConfig", dict(
        num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=3, sliding_window=5,
        **_GQA), 32),
    # Dense: Llama (tied embeddings, GQA), Qwen3 (q/k norms, one sliding and one full layer).
    "llama-tied": ("LlamaConfig", dict(
        num_hidden_layers=2, intermediate_size=48, tie_word_embeddings=True, **_GQA), 32),
    "qwen3-sliding_full": ("Qwen3Config", dict(
        num_hidden_layers=2, intermediate_size=48, head_dim=16, use_sliding_window=True, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], **_GQA), 32),
    # GLM-4-MoE: DeepSeek-V3 routing on GQA with q/k norms and half-rotated heads.
    "glm4_moe-qk_norm_partial_rope": ("Glm4MoeConfig", dict(
        num_hidden_layers=2, first_k_dense_replace=1, n_group=4, topk_group=2, intermediate_size=48, use_qk_norm=True,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        num_nextn_predict_layers=0, **_DS_MOE, **_GQA), 32),
}


# The tiny configurations of transformers' own model tests (tests/models/*/test_modeling_*.py, not in the
# installed package: the values are copied here). Their vocabulary (99) is below the byte tokenizer's 259,
# DeepSeek-V3's top-8 exceeds the 4 experts of its topk_group=1 groups, and some carry training-only
# settings (attention_dropout, router_jitter_noise): hf.load must accept all of them. One change: the
# testers' CausalLMModelTester default hidden_act="gelu" is "silu" here (moejax's SwiGLU; gelu is refused).
_TESTER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, max_position_embeddings=512)
TESTER_CASES = {
    "tester-deepseek_v3": ("DeepseekV3Config", dict(
        _TESTER, intermediate_size=32, moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=8,
        first_k_dense_replace=1, norm_topk_prob=True, aux_loss_alpha=0.001, attention_dropout=0.1), 7),
    "tester-deepseek_v32": ("DeepseekV32Config", dict(
        _TESTER, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37, moe_intermediate_size=12,
        num_experts_per_tok=2, n_routed_experts=8, kv_lora_rank=32, q_lora_rank=16, qk_nope_head_dim=64,
        qk_rope_head_dim=64), 7),
    "tester-deepseek_v4": ("DeepseekV4Config", dict(
        _TESTER, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, num_experts_per_tok=2,
        moe_intermediate_size=64, max_position_embeddings=64, head_dim=32, partial_rotary_factor=8 / 32,
        q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=4, n_shared_experts=1,
        mlp_layer_types=["moe", "moe"], layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3, hc_eps=1e-6, index_n_heads=2, index_head_dim=16,
        index_topk=2, num_nextn_predict_layers=0, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
        swiglu_limit=10.0, rope_theta=10000.0, compress_rope_theta=160000.0, attention_bias=False,
        attention_dropout=0.0), 7),
    "tester-qwen3_moe": ("Qwen3MoeConfig", dict(
        _TESTER, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37, moe_intermediate_size=12,
        num_experts_per_tok=2, num_experts=8), 7),
    # router_jitter_noise: not in transformers' Mixtral tester; added to exercise the training-only notice.
    "tester-mixtral": ("MixtralConfig", dict(
        _TESTER, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, num_local_experts=2,
        num_experts_per_tok=2, router_jitter_noise=0.1), 7),
}
CASES.update(TESTER_CASES)


def config(name: str):
  """The transformers config of case ``name`` (eager attention)."""
  import transformers

  cls, kwargs, _ = CASES[name]
  kwargs = dict(dict(vocab_size=V, hidden_size=32, num_attention_heads=4, max_position_embeddings=1024), **kwargs)
  kwargs.setdefault("hidden_act", "silu")
  if "num_key_value_heads" not in kwargs and not cls.startswith("DeepseekV4"):
    kwargs["num_key_value_heads"] = 4
  out = getattr(transformers, cls)(**kwargs)
  out._attn_implementation = "eager"
  out._experts_implementation = "eager"  # torch's CPU grouped_mm needs 16-byte strides (the testers' width 37 fails)
  return out


def build(name: str, seed: int = 0):
  """(transformers causal LM in eval mode with random weights, token ids [2, T])."""
  import torch
  import transformers

  seq = CASES[name][2]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config(name)).eval()
  randomize(model, seed)
  ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(2, seq))
  return model, ids


def randomize(model, seed: int) -> None:
  """Norm scales 1 + N(0, 0.2^2), every other weight and bias N(0, 0.2^2), hash tables
  random distinct experts per token."""
  import torch

  gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_(noise + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
    for name, b in model.named_buffers():
      if name.endswith("tid2eid"):
        experts = model.config.n_routed_experts
        b.copy_(torch.from_numpy(np.stack([rng.permutation(experts)[:b.shape[1]] for _ in range(b.shape[0])])))
      elif name.endswith("bias"):
        b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def from_pretrained(directory: str):
  """transformers' model of a checkpoint directory, eager attention and experts (as :func:`config`)."""
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                           experts_implementation="eager").eval()


def logits(model, ids) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids))).logits.float().numpy()
