"""DeepSeek-V4-Flash's dimensions (284B total, ~13B active parameters), for compiling and sharding studies.

  moejax compile --config configs/v4_flash.py --topology v5p:4x4x8 --config.optim.name=adamw \
      --config.train.batch_size=128                                          # 128 chips, fsdp=128, T=4096
  moejax compile --config configs/v4_flash.py:t=65536 --topology v5p:8x8x8 --config.mesh.context=4

(docs/sharding.md, "Compiling for a slice you do not have", has what each compiled to.)

Published (deepseek-ai/DeepSeek-V4-Flash config.json, as mirrored by NVIDIA NeMo AutoModel's
DeepseekV4Config defaults and the dequantized 5-layer checkpoints; the V4 report §2):
43 layers, d_model 4096, vocab 129280, 64 query heads and 1 kv head of width 512, q LoRA
rank 1024, 64 rotary channels (interleaved, compressed layers with rope theta 160000),
grouped low-rank output (8 groups, rank 1024), sliding window 128 with sinks on every layer,
compression ratios 4 (CSA, with a lightning indexer of 64 heads x 128, top-512 entries) and
128 (HCA), 256 routed experts of width 2048 + 1 shared, top-6, sqrtsoftplus scores with the
balancing bias, SwiGLU clamp 10, the first 3 MoE layers hash-routed, mHC with 4 streams and
20 Sinkhorn iterations, one MTP module, 1,048,576 positions.

Assumed here (not in the published numbers we found): the layer schedule beyond the first
five ``compress_ratios`` (0, 0, 4, 128, 4): the two leading ratio-0 layers are read as
sliding-window-only (``swa``) and the rest alternate CSA / HCA; the MTP module is a ``swa``
block with a dense MLP of width 2048; float32 parameters with bfloat16 compute; Muon;
every block rematerialised; the repeated (HCA, CSA) pairs scanned (``model.scan_layers``); the
training batch (``train.batch_size``, default 64 x 4096 tokens); capacity dispatch with factor
1.25 (dropless compiles a capacity ladder up to every token on one expert: [256, 4096, 4096]
bf16 buffers, 8 GiB each, which alone put a v5p chip out of HBM).
The argument (moejax/config_variants.py grammar) sets the sequence length: ``t=65536``.
"""

from moejax.config import base_config
from moejax.config_variants import parse_arg
from moejax.layers.routers import ROUTER_RECIPES

LAYERS = 43
SCHEDULE = ("swa", "swa") + tuple("csa" if i % 2 == 0 else "hca" for i in range(LAYERS - 2))


def get_config(arg: str | None = None):
  seq_len = parse_arg(arg, t=4096).t
  c = base_config()
  c.model.update(num_layers=LAYERS, d_model=4096, vocab_size=129280, num_heads=64, num_kv_heads=1, head_dim=512,
                 ffn_dim=2048, dtype="bfloat16", attention_types=SCHEDULE,
                 mlp_types=("hash_moe",) * 3 + ("moe",) * (LAYERS - 3), remat=("full",),
                 scan_layers=True)  # layers 3-42, (hca, csa) x 20, traced and compiled once
  c.model.attention.update(
      window=128, sinks=True, q_lora_rank=1024, rope_dim=64, rope_layout="interleave",
      compress_rope_theta=160_000.0, csa_ratio=4, hca_ratio=128, o_groups=8, o_lora_rank=1024,
      index_heads=64, index_head_dim=128, index_topk=512, chunk_size=512)
  c.model.moe.update(num_experts=256, top_k=6, expert_ffn_dim=2048, num_shared=1, dispatch="capacity",
                     capacity_factor=1.25, **ROUTER_RECIPES["v4"])
  c.model.hc.update(streams=4, sinkhorn_iters=20)
  c.model.mtp.update(depth=1, loss_weight=0.3, attention_type="swa", mlp_type="dense")
  c.optim.update(name="muon", learning_rate=2.7e-4, warmup_steps=2000)
  c.data.seq_len = seq_len
  c.train.update(batch_size=64, loss_chunk=1024)
  c.mesh.update(data=1, fsdp=-1)
  return c
