"""A user optimizer in one file, with its own validated options: Signum (sign of the momentum).

  moejax train --config configs/extend/my_optimizer.py --workdir workdirs/signum
  moejax train --config configs/extend/my_optimizer.py --config.optim.signum.momentum=0.95 ...

Signum (Bernstein et al., 2018): ``m <- momentum * m + (1 - momentum) * g``,
``w <- w - lr * (sign(m) + weight_decay * w)`` (decay on matrices only).
The entry owns its options section ``optim.signum`` (fields, defaults, checks),
as ``muon`` owns ``optim.muon``: ``use_optimizer`` adds the section with its
defaults, validation runs :func:`validate_signum`, so
``--config.optim.signum.momentum=1.5`` fails before anything compiles, naming
the field. docs/extending.md; tests/test_extending.py.
"""

import ml_collections
import optax

from moejax.config import base_config
from moejax.optim.registry import OPTIMIZERS, use_optimizer, weight_decay_mask


def signum_options() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      momentum=0.9,  # EMA decay of the gradient whose sign is the update
  ))


def validate_signum(cfg) -> list[str]:
  s, e = cfg.optim.signum, []
  if not 0.0 <= s.momentum < 1.0:
    e.append(f"optim.signum.momentum={s.momentum} must be in [0, 1) (0.9 is usual).")
  return e


@OPTIMIZERS.register("signum", section="signum", defaults=signum_options, validate_config=validate_signum)
def signum(o: ml_collections.ConfigDict, lr: optax.Schedule, layout=None) -> optax.GradientTransformation:
  return optax.chain(optax.ema(o.signum.momentum, debias=False), optax.scale_by_sign(),
                     optax.add_decayed_weights(o.weight_decay, weight_decay_mask), optax.scale_by_learning_rate(lr))


def get_config(arg: str | None = None):
  c = base_config()
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128)
  c.data.update(seq_len=64, stdlib_packages="json")
  c.train.update(steps=200, batch_size=8, log_every=10, eval_every=0, checkpoint_every=100)
  c.optim.update(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)
  return use_optimizer(c, "signum")  # optim.name = "signum" and optim.signum with its defaults
