"""Optional test dependencies (the transformers/torch oracles, tokenizers, sentencepiece, tokamax).

``require("torch")`` replaces ``pytest.importorskip("torch")``: where the module
is missing it skips the test (or the module, when called at import time) on a
developer machine, but under ``CI=true`` it fails, so a broken install in CI
cannot turn the oracle tests into a green run of skips. Call it inside the tests
that need the module, not at module level of a file that also holds tests that
do not (tests/test_oracle_guard.py checks that no test uses ``importorskip``).
"""

import importlib
import os

import pytest


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(name: str, extra: str = "interop"):
  """The imported module ``name``; a skip when it is missing, a failure when it is missing under CI=true.

  ``extra`` names the pyproject extra that installs it (for the message).
  """
  try:
    return importlib.import_module(name)
  except ImportError as e:
    message = f"{name} is not importable ({e}); install the {extra} extra: pip install -e '.[dev,{extra}]'"
    if in_ci():
      pytest.fail(f"CI=true: an oracle test cannot be skipped: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)
