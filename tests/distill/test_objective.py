"""The distillation step against a full-logits reference; frozen teachers; per-domain metrics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.distill.config import rows_per_domain
from moejax.distill.data import DomainBatches
from moejax.objective import forward
from tests.distill.helpers import distill_experiment, tiny_distill_cfg

pytestmark = pytest.mark.slow(minutes=3)  # on 2 cores; the longest modules start first (tests/conftest.py)


def _np_log_softmax(l):
  l = l - l.max(-1, keepdims=True)
  return l - np.log(np.exp(l).sum(-1, keepdims=True))


def _logits(exp, params, model_state, batch):
  """Student and every teacher's full [B, T, V] logits on the whole batch (one compile)."""
  apply = lambda m, variables: m.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"])
  return jax.jit(lambda p, ms, teachers: (apply(exp.model, {"params": p, **ms}),
                                          [apply(t.model, {"params": tp, **tms}) for t, (tp, tms)
                                           in zip(exp.teachers, teachers)]))(params, model_state, exp.cohost_extra)


def reference(exp, params, model_state, batch, temperature, reverse):
  """CE and KL means (and per domain) in float64 NumPy, each row's teacher picked by its domain id."""
  ls, lt_per_teacher = jax.tree.map(lambda a: np.asarray(a, np.float64), _logits(exp, params, model_state, batch))
  domain_B = batch["domain_BxT"][:, 0]
  lt = np.stack([lt_per_teacher[k][b] for b, k in enumerate(domain_B)])
  w = batch["weights"].astype(np.float64)
  ce = -np.take_along_axis(_np_log_softmax(ls), batch["targets"][..., None], -1)[..., 0]
  logp_s, logp_t = _np_log_softmax(ls / temperature), _np_log_softmax(lt / temperature)
  p, logp, logq = (np.exp(logp_s), logp_s, logp_t) if reverse else (np.exp(logp_t), logp_t, logp_s)
  kl = np.sum(p * (logp - logq), -1)
  per_domain = {k: (np.sum(ce[domain_B == k] * w[domain_B == k]) / w[domain_B == k].sum(),
                    np.sum(kl[domain_B == k] * w[domain_B == k]) / w[domain_B == k].sum()) for k in set(domain_B)}
  return (ce * w).sum() / w.sum(), (kl * w).sum() / w.sum(), per_domain


def reference_grad_norm(exp, params, model_state, batch, alpha, temperature, reverse):
  """|grad| of the full-logits objective w.r.t. the student's parameters (teachers constant)."""
  _, lts = _logits(exp, params, model_state, batch)
  lt = jnp.stack([lts[k][b] for b, k in enumerate(batch["domain_BxT"][:, 0])])
  w = jnp.asarray(batch["weights"])

  def objective(p):
    ls = exp.model.apply({"params": p, **model_state}, batch["inputs"], batch["positions"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(ls, batch["targets"])
    logp_s, logp_t = jax.nn.log_softmax(ls / temperature), jax.nn.log_softmax(lt / temperature)
    kl = (jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), -1) if reverse
          else jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), -1))
    return (alpha * jnp.sum(ce * w) + (1 - alpha) * temperature ** 2 * jnp.sum(kl * w)) / jnp.sum(w)

  return optax.tree.norm(jax.jit(jax.grad(objective))(params))


@pytest.fixture(scope="module")
def default_exp(devices):
  """Forward KL, T=1, alpha=0.5, no accumulation (shared: building costs a compile)."""
  return distill_experiment(tiny_distill_cfg(), devices[:1])


@pytest.fixture(scope="module")
def reverse_exp(devices):
  """Reverse KL, T=2, alpha=0.3, 3 micro-batches (on-policy lengths set for the on-policy test)."""
  cfg = tiny_distill_cfg(kl="reverse", temperature=2.0, alpha=0.3, prompt_len=8, continuation_len=8)
  cfg.train.grad_accum_steps = 3
  return distill_experiment(cfg, devices[:1])


@pytest.mark.parametrize("fixture,kl,temperature,alpha", [("default_exp", "forward", 1.0, 0.5),
                                                          ("reverse_exp", "reverse", 2.0, 0.3)])
def test_distill_step_matches_full_logits_reference(request, fixture, kl, temperature, alpha):
  exp = request.getfixturevalue(fixture)
  state, batch = exp.init_state(), next(exp.data_iterator("train"))
  params, model_state = jax.device_get((state.params, state.model_state))
  ce, kl_mean, per_domain = reference(exp, params, model_state, batch, temperature, kl == "reverse")
  grad_norm = reference_grad_norm(exp, params, model_state, batch, alpha, temperature, kl == "reverse")
  _, metrics = exp.train_step(state, batch)
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl_mean, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["total_loss"], alpha * ce + (1 - alpha) * temperature ** 2 * kl_mean
                             + metrics["aux_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
  for s in exp.slices:
    np.testing.assert_allclose(metrics[f"train_ce_{s.name}"], per_domain[s.index][0], rtol=1e-5)
    np.testing.assert_allclose(metrics[f"train_kl_{s.name}"], per_domain[s.index][1], rtol=1e-4, atol=1e-7)


def test_teachers_are_frozen_and_rows_routed_per_domain(default_exp):
  """No gradient reaches the teachers, steps leave them bit-identical, and each
  domain's routing counts are exactly top_k per non-padding token of its rows."""
  exp = default_exp
  state, data = exp.init_state(), exp.data_iterator("train")
  batch = next(data)
  before = jax.device_get(exp.extra)
  out = jax.jit(lambda p, ms: forward(exp.model, p, ms, batch, exp.cfg.train.loss_chunk, capture_experts=True))(
      state.params, state.model_state)
  grads = jax.jit(jax.grad(lambda extra: exp.objective.term(extra, batch, out, jnp.sum(batch["weights"]))[0]))(
      exp.extra)
  chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))
  for _ in range(2):
    state, metrics = exp.train_step(state, next(data))
  chex.assert_trees_all_equal(jax.device_get(exp.extra), before)
  for s in exp.slices:
    np.testing.assert_allclose(np.sum(metrics[f"layer_1/mlp/domain_{s.name}_experts"]), 1.0, rtol=1e-5)

  sums = exp.evaluation_sums(state, 1)
  valid = next(DomainBatches(exp.cfg, split="validation", seed=exp.cfg.seed))
  tokens_K = [np.sum(valid["segment_ids"][valid["domain_BxT"][:, 0] == s.index] > 0) for s in exp.slices]
  np.testing.assert_array_equal(sums["routing/layer_1/mlp"].sum(-1), exp.cfg.model.moe.top_k * np.asarray(tokens_K))


def test_rows_per_domain_follow_weights():
  cfg = tiny_distill_cfg()
  assert rows_per_domain(cfg) == {"copy": 4, "email": 2}
  cfg.train.batch_size = 12
  cfg.distill.domains.copy.weight = 1.0
  assert rows_per_domain(cfg) == {"copy": 6, "email": 6}


def test_on_policy_step_scores_the_students_own_samples(reverse_exp):
  """mode=on_policy: rows are the student's continuations of data prompts (deterministic per
  step), weighted on the sampled part only, and the step's KL matches the reference on them."""
  exp = reverse_exp
  state, data_batch = exp.init_state(), next(exp.data_iterator("train"))
  batch = exp.on_policy_batch(state, data_batch)
  chex.assert_trees_all_equal(batch, exp.on_policy_batch(state, data_batch))
  chex.assert_shape(batch["inputs"], (6, 15))
  np.testing.assert_array_equal(batch["inputs"][:, :8], data_batch["inputs"][:, :8])
  np.testing.assert_array_equal(batch["weights"].sum(1), 8.0)
  np.testing.assert_array_equal(batch["domain_BxT"], data_batch["domain_BxT"][:, :15])
  ce, kl_mean, _ = reference(exp, *jax.device_get((state.params, state.model_state)), batch, 2.0, True)
  exp.cfg.distill.mode = "on_policy"
  try:
    _, metrics = exp.train_step(state, data_batch)
  finally:
    exp.cfg.distill.mode = "off_policy"
  np.testing.assert_allclose(metrics["kl"], kl_mean, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)
