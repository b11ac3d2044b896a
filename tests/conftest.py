"""Test setup: 8 forced host devices (set before JAX is imported)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"
  return jax.devices()
