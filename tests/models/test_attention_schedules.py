"""The sparse attention types train inside the Transformer, mixed in one schedule, sharded or not."""

import json

import numpy as np
import pytest

from moejax.train import train
from tests.test_train import _run_steps, small_train_cfg

MIXED = ("swa", "csa", "hca", "dsa", "mla")  # dense and sliding train in the other model tests' configs


@pytest.mark.slow
@pytest.mark.multidevice
def test_mixed_schedule_trains_logs_indexer_metrics_and_shards(devices, tmp_path):
  cfg = small_train_cfg(steps=8, checkpoint_every=100)
  cfg.model.update(num_layers=len(MIXED), attention_types=MIXED)
  cfg.model.attention.update(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8,
                             v_head_dim=16, window=8, csa_ratio=4, hca_ratio=16, index_heads=2, index_head_dim=16,
                             index_topk=8, o_groups=2, o_lora_rank=16, rope_dim=8, rope_layout="interleave",
                             chunk_size=16, sinks=True)
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  train(cfg, str(tmp_path), devices[:1])
  with open(tmp_path / "metrics.jsonl") as f:
    history = [json.loads(line) for line in f]
  assert history[-1]["loss"] < history[0]["loss"] - 0.3, [h["loss"] for h in history]
  for layer in (1, 3):  # csa, dsa
    assert 0 < history[-1][f"layer_{layer}/attention/indexer_recall"] <= 1
    assert history[-1][f"layer_{layer}/attention/indexer_kl"] > 0
  assert history[-1]["aux_loss"] > 0  # the indexer KLs
  assert all(np.isfinite(h["grad_norm"]) for h in history)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  sharded_losses, _ = _run_steps(cfg, devices, 2)
  np.testing.assert_allclose(sharded_losses, [h["loss"] for h in history[:2]], rtol=1e-5)
