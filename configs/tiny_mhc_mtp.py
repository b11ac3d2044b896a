"""The tiny LM with the DeepSeek-V4 residual and objective: manifold-constrained
hyper-connections (4 residual streams) and one multi-token-prediction module.

  moejax train --config configs/tiny_mhc_mtp.py --workdir workdirs/tiny_mhc_mtp

Everything else is ``configs/tiny.py``, variants included: ``:ARG`` goes to
tiny.py's ``get_config`` (the same grammar, moejax/config_variants.py), e.g.
``configs/tiny_mhc_mtp.py:copy``. metrics.jsonl gets
``mtp_loss_1`` next to ``loss`` (the main next-token loss) and, at eval
steps, ``eval_mtp_loss_1``.
"""

import os

from moejax.config import load_config


def get_config(arg: str | None = None):
  tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
  c = load_config(f"{tiny}:{arg}" if arg else tiny)
  c.model.hc.update(streams=4, sinkhorn_iters=20)
  c.model.mtp.update(depth=1, loss_weight=0.3)
  return c
