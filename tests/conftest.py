"""Test setup: 8 forced host devices and compile-fast XLA flags (set before JAX is imported)."""

import os

# The suite is compile-bound: tiny models, compiled once, run a few steps. LLVM at
# optimisation level 0 compiles the V4 smoke step 38% faster (47 -> 29 s) and runs it
# slower (183 -> 226 ms); numerics move by rounding (a loss by 1.5e-5 relative), so no
# test compares against numbers from another optimisation level. Subprocesses (CLI,
# notebooks, the accelerator smoke) get the same flags; MOEJAX_TEST_XLA_FLAGS="" tests
# at full optimisation.
os.environ.setdefault("MOEJAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), os.environ["MOEJAX_TEST_XLA_FLAGS"],
                                                 "--xla_force_host_platform_device_count=8"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same tiny models many times (fresh Experiments, CLI subprocesses, both
# xdist workers): a persistent compilation cache, shared through the environment,
# compiles each program once per checkout. A cached executable is the one XLA would
# build again, so results do not change; set JAX_COMPILATION_CACHE_DIR to move it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bytes; least recently used go first

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"
  return jax.devices()


def pytest_collection_modifyitems(config, items):
  """Modules holding ``slow`` tests run first, the longest first (``slow(minutes=N)``: a module's
  rough time on 2 cores), in collection order otherwise.

  ``--dist loadscope`` (pyproject.toml) hands each module to one xdist worker,
  so a module's fixtures (compiled models) are built once; starting the long
  modules first keeps one of them from running alone at the end.
  """
  minutes: dict[str, float] = {}
  for item in items:
    mark = item.get_closest_marker("slow")
    if mark:
      name = item.module.__name__
      minutes[name] = max(minutes.get(name, 0.0), mark.kwargs.get("minutes", 1.0))
  items.sort(key=lambda item: -minutes.get(item.module.__name__, 0.0))
