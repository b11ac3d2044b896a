"""A user data source in one file, with its own validated option: addition problems.

  moejax train --config configs/extend/my_source.py --workdir workdirs/addition

Each document is ``bos + "a+b=c" + eos`` for random ``addition_digits``-digit
numbers a and b; only the answer ``c`` and the eos carry loss weight, so the
loss measures addition alone. The source reads ``data.addition_digits``, a
field this file adds, and checks it (:func:`validate_addition`) when the
config selects the source. docs/extending.md; tests/test_extending.py.
"""

import numpy as np

from moejax.config import base_config
from moejax.data.source import SOURCES, check_split, document

EXAMPLES = {"train": 1 << 20, "validation": 1 << 10}


class Addition:
  """A random-access sequence of addition documents, document i drawn from seed (split, i)."""

  def __init__(self, digits: int, split: str, tokenizer):
    check_split(split)
    self.digits, self.split, self.tokenizer = digits, split, tokenizer

  def __len__(self) -> int:
    return EXAMPLES[self.split]

  def __getitem__(self, i: int):
    rng = np.random.default_rng([list(EXAMPLES).index(self.split), i])
    a, b = (int(x) for x in rng.integers(0, 10 ** self.digits, size=2))
    question, answer = self.tokenizer.encode(f"{a}+{b}="), self.tokenizer.encode(str(a + b))
    tokens = [self.tokenizer.bos_id, *question, *answer, self.tokenizer.eos_id]
    weights = [0.0] * (1 + len(question)) + [1.0] * (len(answer) + 1)
    return document(tokens, weights)


def validate_addition(cfg) -> list[str]:
  digits = cfg.data.get("addition_digits")
  if digits is None:
    return ["data.addition_digits is missing; the addition source needs it: set c.data.addition_digits = 3 in "
            "get_config (configs/extend/my_source.py)."]
  return [] if 1 <= digits <= 18 else [f"data.addition_digits={digits} must be in [1, 18]."]


@SOURCES.register("addition", validate_config=validate_addition)
def addition(data_cfg, split: str, tokenizer) -> Addition:
  return Addition(data_cfg.addition_digits, split, tokenizer)


def get_config(arg: str | None = None):
  c = base_config()
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128)
  c.data.update(source="addition", seq_len=64)
  c.data.addition_digits = 3  # the source's option: a field of the schema from here on
  c.train.update(steps=300, batch_size=8, log_every=10, eval_every=100, checkpoint_every=100)
  c.optim.update(learning_rate=3e-3, warmup_steps=10)
  return c
