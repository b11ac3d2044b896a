"""A new layer type plugs in from outside the framework: registry, sown
metrics, and non-trainable state updated after each step from summed stats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.mlp import MLP, SwiGLU
from moejax.models.state import STATE_UPDATES
from moejax.train import Experiment
from tests.test_train import small_train_cfg


@MLP.register("counting_swiglu")
class CountingSwiGLU(nn.Module):
  """SwiGLU that counts the tokens it has seen in a ``token_count`` collection."""

  cfg: object

  @nn.compact
  def __call__(self, x_BxTxD, token_ids_BxT):
    count = self.variable("token_count", "seen", lambda: jnp.zeros((), jnp.float32))
    self.sow("stats", "tokens", jnp.asarray(x_BxTxD.shape[0] * x_BxTxD.shape[1], jnp.float32))
    self.sow("metrics", "count_before", count.value)
    return SwiGLU(self.cfg, name="inner")(x_BxTxD, token_ids_BxT)


@STATE_UPDATES.register("token_count")
def _add_tokens(tree, stats, model_cfg, step):
  return {layer: {"mlp": {"seen": sub["mlp"]["seen"] + stats[layer]["mlp"]["tokens"][0]}}
          for layer, sub in tree.items()}


def test_registered_mlp_state_update_and_metrics(devices):
  cfg = small_train_cfg()
  cfg.model.mlp_types = ("dense", "counting_swiglu")
  cfg.train.grad_accum_steps = 2
  exp = Experiment(cfg, devices[:1])
  state, data = exp.init_state(), exp.data_iterator("train")
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  for step in range(3):
    state, metrics = exp.train_step(state, next(data))
    assert float(metrics["layer_1/mlp/count_before"]) == step * tokens_per_step
  seen = state.model_state["token_count"]["layer_1"]["mlp"]["seen"]
  np.testing.assert_equal(float(seen), 3 * tokens_per_step)
  assert "layer_0" not in state.model_state["token_count"]
