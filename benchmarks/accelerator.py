"""One prepared accelerator suite: train steps at ~1B scale and the MoE dispatch backends, on one device.

  python benchmarks/accelerator.py                 # one H100 / one TPU chip: the full suite
  python benchmarks/accelerator.py --smoke         # the same code at tiny sizes, CPU (~3 min on 2 cores)
  python benchmarks/accelerator.py --cases dense,moe8 --steps 5 --results-dir /tmp/r

Train-step cases (bf16 compute, float32 parameters and AdamW moments unless stated,
random tokens, one device, repeated layers scanned (``model.scan_layers``; the H100 rows of
2026-11-27 predate that and are unrolled); median of ``--steps`` steps after two warm-up steps):

* ``dense``: ~0.9B dense GQA model (16 layers, d 2048, 16 heads / 8 kv, SwiGLU 5632,
  vocab 32000) at T = 4096, batch 4.
* ``moe8``: ~1.0B total, ~0.5B active: the same attention, 8 experts top-2 of width 896.
* ``moe64``: the same total and active size, fine-grained: 64 experts top-16 of width 112.
* ``v4_4k`` / ``v4_32k``: the DeepSeek-V4 schedule (2 x HCA, then alternating CSA / HCA, a
  hash-routed first MoE layer, 64 experts top-6 + 1 shared, 12 layers, d 1024) at T = 4096
  (batch 4) and T = 32768 (batch 1, every block rematerialised).
* ``moe8_muon``: ``moe8`` with Muon (AdamW on embeddings / head / router, as configured).

Time: the target is 8 minutes on one H100; it is not met. Compilation dominates, and on a GPU
it runs kernels (XLA's autotuning), so it does not parallelise across cases on one device. On an
H100 (JAX 0.11.2) a case compiled alone in 30 s (dense) to 90 s (8 experts on ``einsum``: a
``lax.switch`` over the dropless capacities; 64 experts took 172 s beside six other
compiles), plus a few seconds to start its process. Two tries
at compiling every case at once in its own process both lost: with JAX's default allocator the
autotuners ran out of device memory (5 of 7 cases failed), and with the on-demand allocator 3
of 4 had not finished compiling after 150 s (``docs/benchmarks.md`` § Accelerator suite). Run
``--cases`` subsets under a short lease. The cases now scan their repeated layers, which on CPU
halves the compile of a 17-layer model (``docs/benchmarks.md`` § Scanned layers); whether that
brings the suite under 8 minutes on a GPU is not yet measured.

Every case runs in a fresh process (the suite's own process never opens the device), so
its peak memory is its own and an out-of-memory or a failed compile becomes a row with
the error. A case whose library kernel (tokamax MoE, cuDNN attention) fails is rerun on
the pure-JAX paths and reported twice. Results are written after every case.

Each row: tokens/s, MFU (``moejax.flops`` model FLOPs, remat not counted, over the
device's bf16 peak; unknown on CPU), peak device memory (``device.memory_stats()``
``peak_bytes_in_use``; not reported by the CPU backend), compile time (the train step's
ahead-of-time lowering and compilation, ``Experiment.lower_train_step``) and the MoE
dispatch / attention kernel each case resolved to. Then every MoE dispatch backend on one
layer (fwd + bwd, 16K tokens, d 2048, 64 experts top-6 of width 1408) side by side, as
ratios to a dense SwiGLU MLP of the same active FLOPs.

Memory (reasoned, not compiled at full size on CPU, which takes longer than the suite):
per parameter 4 (fp32 weights) + 4 (grads) + 8 (two Adam moments) = 16 bytes, so ~1B
parameters take ~16 GB. Activations without remat at 16K tokens per step: the block
inputs and the saved matmul inputs/outputs are ~20 [T, D] bf16 tensors per layer (attention
runs in cuDNN on a GPU or chunked, so no [T, T] scores are kept): 16K x 2048 x 2 B x 20
~ 1.3 GB per layer, ~21 GB for 16 layers, plus the SwiGLU/expert hidden ([16K, 5632] x 3)
and the loss formed ``loss_chunk`` positions at a time: under 45 GB in all. ``v4_32k``
rematerialises every block (only block inputs stay: 32K x 1024 x 2 B x 12 = 0.8 GB) so the
compressed-attention temporaries of one block dominate. The cases run one after another
and each frees its state before the next, so the largest single case must fit in 80 GB.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np

from moejax.benchmarking import RESULTS_DIR, Results, summary
from moejax.config import base_config
from moejax.flops import mfu, model_flops, peak_flops
from moejax.layers.attention import ATTENTION
from moejax.layers.attention.options import attention_kernel, xla_max_len
from moejax.layers.moe_dispatch import BACKENDS, resolve_backend, unavailable_because
from moejax.models.scan import scan_plan

V4_SCHEDULE = ("hca", "hca") + ("csa", "hca") * 5


def _dense(c, smoke: bool):
  if smoke:
    c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128, vocab_size=512)
  else:
    c.model.update(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=8, ffn_dim=5632, vocab_size=32000)


def _moe(c, smoke: bool, experts: int):
  _dense(c, smoke)
  width = (128 if smoke else 896) * 8 // experts
  c.model.update(mlp_types=("moe",))
  c.model.moe.update(num_experts=experts, top_k=experts // 4, expert_ffn_dim=width, num_shared=0, score="softmax")


def _v4(c, smoke: bool, long: bool):
  # The smoke keeps one layer of each kind (HCA with the hash-routed MoE, then CSA with the learned router).
  schedule = V4_SCHEDULE[1:3] if smoke else V4_SCHEDULE
  layers = len(schedule)
  c.model.update(num_layers=layers, d_model=64 if smoke else 1024, num_heads=4 if smoke else 16,
                 num_kv_heads=1, ffn_dim=128 if smoke else 2816, vocab_size=512 if smoke else 32000,
                 attention_types=schedule, mlp_types=("hash_moe",) + ("moe",) * (layers - 1),
                 remat=("full",) if long else ("none",))
  c.model.attention.update(window=128, sinks=True, q_lora_rank=32 if smoke else 512, rope_dim=16 if smoke else 64,
                           rope_layout="interleave", csa_ratio=4, hca_ratio=128, index_heads=2 if smoke else 8,
                           index_head_dim=16 if smoke else 64, index_topk=64 if smoke else 512, o_groups=2,
                           o_lora_rank=32 if smoke else 512, compress_rope_theta=160_000.0)
  c.model.moe.update(num_experts=16 if smoke else 64, top_k=4 if smoke else 6, expert_ffn_dim=32 if smoke else 512,
                     num_shared=1)


# name: (builder(cfg, smoke), seq_len full, batch full, optimizer)
CASES = {
    "dense": (lambda c, s: _dense(c, s), 4096, 4, "adamw"),
    "moe8": (lambda c, s: _moe(c, s, 8), 4096, 4, "adamw"),
    "moe64": (lambda c, s: _moe(c, s, 64), 4096, 4, "adamw"),
    "v4_4k": (lambda c, s: _v4(c, s, long=False), 4096, 4, "muon"),
    "v4_32k": (lambda c, s: _v4(c, s, long=True), 32768, 1, "muon"),
    "moe8_muon": (lambda c, s: _moe(c, s, 8), 4096, 4, "muon"),
}


def case_config(name: str, smoke: bool, fallback: bool = False, overrides: tuple[str, ...] = ()):
  """The config of case ``name``; ``fallback``: the pure-JAX paths (MoE ``einsum``, attention without
  library kernels), the rerun of a case whose library kernel failed; ``overrides``: ``KEY=VALUE`` strings
  (``--set model.attention.xla_max_len=4096``) applied last."""
  build, seq_len, batch, optimizer = CASES[name]
  c = base_config()
  build(c, smoke)
  if fallback:
    c.model.moe.backend = "einsum"
    c.model.attention.implementation = "chunked" if seq_len > xla_max_len(c.model) else "xla"
  c.model.dtype = "bfloat16"
  # Repeated layers compile once (moejax/models/scan.py): 16 identical blocks, or V4's (hca, csa) pairs.
  c.model.scan_layers = scan_plan(c.model) is not None
  c.data.seq_len = 256 if smoke else seq_len
  c.train.update(batch_size=2 if smoke else batch, steps=100, loss_chunk=1024)
  c.optim.update(name=optimizer, warmup_steps=0)
  c.mesh.update(data=1)
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string
    c.update_from_flattened_dict({key: value})
  return c


def backends_used(cfg, platform: str) -> str:
  """The MoE dispatch backend and attention kernel(s) the config resolves to on ``platform``."""
  kernel = "/".join(sorted({attention_kernel(cfg.model, cfg.data.seq_len, ATTENTION.capability(t, "library_kernels"),
                                             platform) for t in cfg.model.attention_types}))
  mlp = set(cfg.model.mlp_types)
  moe = resolve_backend(cfg.model.moe.backend, cfg.model.moe.dispatch == "dropless", False, platform) \
      if mlp & {"moe", "hash_moe"} else "-"
  return f"moe {moe}, attention {kernel}"


def random_batch(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
  b, t = cfg.train.batch_size, cfg.data.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def run_case(name: str, smoke: bool, steps: int, fallback: bool = False, overrides: tuple[str, ...] = ()) -> dict:
  """Compiles case ``name`` ahead of time (train step and init), then times ``steps`` steps after two
  warm-up steps."""
  from moejax.sharding import put_batch
  from moejax.train import Experiment

  cfg = case_config(name, smoke, fallback, overrides)
  device = jax.devices()[0]
  exp = Experiment(cfg, [device])
  start = time.perf_counter()
  step = exp.lower_train_step().compile()
  compile_s = time.perf_counter() - start
  init = exp.lower_init().compile()
  state, rng, times = init(jax.random.key(cfg.seed)), np.random.default_rng(0), []
  for _ in range(steps + 2):
    batch = put_batch(random_batch(cfg, rng), exp.mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch, exp.extra)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  stats = summary(times[2:])
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = model_flops(cfg.model, cfg.data.seq_len)
  peak = peak_flops(device.device_kind)
  memory = (device.memory_stats() or {}).get("peak_bytes_in_use")  # this process ran this case alone
  return {"case": name, **stats, "tokens_per_step": tokens, "tokens_per_s": tokens / stats["median_s"],
          "model_tflops_per_token": flops.train / 1e12,
          "mfu": mfu(flops.train, tokens / stats["median_s"], 1, peak) if peak else None,
          "peak_memory_bytes": memory, "compile_s": compile_s, "first_step_s": times[0],
          "backends": backends_used(cfg, device.platform), "scan_layers": cfg.model.scan_layers,
          "loss": float(metrics["loss"]), "fallback": fallback}


def run_layer_backends(smoke: bool, steps: int) -> list[dict]:
  """Every MoE dispatch backend that can run here (its optional package installed) on one layer, fwd + bwd,
  interleaved rounds (``benchmarks/moe_layer.py``), as ratios to a dense SwiGLU MLP of the same active
  FLOPs (width ``(top_k + shared) * expert width``). A backend that fails to compile is reported, not fatal."""
  import jax.numpy as jnp
  import ml_collections
  # benchmarks/ is on sys.path when this file runs as a script
  from moe_layer import moejax_step

  from moejax.benchmarking import interleaved

  cfg = base_config().model
  d, experts, top_k, width, tokens = (64, 16, 4, 32, 512) if smoke else (2048, 64, 6, 1408, 16384)
  cfg.update(d_model=d, dtype="bfloat16", vocab_size=320, ffn_dim=(top_k + 1) * width)
  cfg.moe.update(num_experts=experts, top_k=top_k, expert_ffn_dim=width, num_shared=1, score="softmax")
  x = jax.random.normal(jax.random.key(0), (1, tokens, d), jnp.bfloat16)
  variants = {"dense MLP": ("dense", None, None)}
  variants |= {f"{b} ({'dropless' if BACKENDS.get(b).dropless else 'capacity'})":
               ("moe", b, "dropless" if BACKENDS.get(b).dropless else "capacity") for b in BACKENDS.names()}
  steps_fns, failed = {}, []
  for name, (mlp_type, backend, dispatch) in variants.items():
    if backend and (why := unavailable_because(backend)):
      print(f"  MoE layer backend {backend}: skipped, {why}")
      continue
    layer_cfg = cfg.copy_and_resolve_references()
    if backend:
      layer_cfg.moe.update(backend=backend, dispatch=dispatch)
    try:
      step, _ = moejax_step(x, mlp_type, ml_collections.FrozenConfigDict(layer_cfg))
      step(), step()  # compile, then one untimed run (the first run after compiling is slow on CPU)
    except Exception as e:  # noqa: BLE001 -- a library kernel that fails here is a result to report
      print(f"  MoE layer {name}: failed: {_exception_line(e)}", flush=True)
      failed.append({"layer_backend": name, "tokens": tokens, "error": _exception_line(e)})
      continue
    steps_fns[name] = lambda step=step: _timed(step)
  samples = interleaved(steps_fns, steps)
  first = next(iter(samples))
  return [{"layer_backend": n, "tokens": tokens, **summary(s, samples[first])} for n, s in samples.items()] + failed


def _exception_line(e: BaseException) -> str:
  """``Type: first line of the message`` (JAX appends notes, such as its traceback filtering, after it)."""
  message = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {message}"[:500]


def run_isolated(what: str, smoke: bool, steps: int, fallback: bool = False,
                 overrides: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
  """Runs one case (or ``layer``) in a fresh process: its peak device memory is its own, and an
  out-of-memory or a crashed compile is a row with the error instead of the end of the suite.
  Returns the rows and the child's {platform, device_kind} (empty if it never got that far)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--steps", str(steps)]
  cmd += ["--smoke"] * smoke + ["--fallback"] * fallback + [f"--set={o}" for o in overrides]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = proc.stdout.splitlines()
  sys.stdout.write("".join(line + "\n" for line in lines if not line.startswith((_ROWS, _DEVICE))))
  rows = [json.loads(line[len(_ROWS):]) for line in lines if line.startswith(_ROWS)]
  device = next((json.loads(line[len(_DEVICE):]) for line in lines if line.startswith(_DEVICE)), {})
  if proc.returncode or not rows:
    error = _error_line(proc.stderr) or f"exit status {proc.returncode}"
    print(f"  {what}: failed: {error}", flush=True)
    return [{"case" if what != "layer" else "layer_backend": what, "error": error,
             "fallback": fallback, "returncode": proc.returncode}], device
  return rows, device


_ROWS, _DEVICE = "ROWS ", "DEVICE "  # a child's result lines on stdout


def _error_line(stderr: str) -> str:
  """The exception line of a child's traceback (the last ``SomethingError: ...`` line), else its last line."""
  lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
  errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
  return (errors or lines or [""])[-1][:500]


def _timed(step) -> float:
  start = time.perf_counter()
  step()
  return time.perf_counter() - start


def table(record: dict) -> str:
  """Markdown: the train-step cases, then the MoE layer backends (``benchmarks/report.py``)."""
  gib = lambda b: f"{b / 2 ** 30:.1f}" if b else "n/a"
  pct = lambda x: "unknown" if x is None else f"{x:.1%}"
  lines = ["| case | step ms (median) | tokens/s | MFU | peak memory GiB | compile s | backends |",
           "|---|---|---|---|---|---|---|"]
  # ``others_compiling``: rows of the parallel-compile try (75f5490) measured while other cases compiled
  beside = lambda r: f" (beside {r['others_compiling']} compiling)" if r.get("others_compiling") else ""
  for r in record["rows"]:
    if "case" not in r:
      continue
    name = r["case"] + (" (pure-JAX fallback)" if r.get("fallback") else "") + beside(r)
    if "error" in r:
      lines.append(f"| {name} | failed: {r['error'].replace('|', '/')[:160]} | | | | | |")
    else:
      lines.append(f"| {name} | {r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {pct(r['mfu'])} | "
                   f"{gib(r['peak_memory_bytes'])} | {r['compile_s']:.1f} | {r['backends']} |")
  layer = [r for r in record["rows"] if "layer_backend" in r]
  if layer:
    lines += ["", "| MoE layer | fwd+bwd ms (median) | ratio to dense MLP (min-max) |", "|---|---|---|"]
    lines += [f"| {r['layer_backend']}{beside(r)} | failed: {r['error'].replace('|', '/')[:160]} | |" if "error" in r else
              f"| {r['layer_backend']}{beside(r)} | {r['median_s'] * 1e3:.2f} | {r['ratio']:.2f} "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |" for r in layer]
  return "\n".join(lines)


def _child(what: str, smoke: bool, steps: int, fallback: bool, overrides: tuple[str, ...]) -> None:
  device = jax.devices()[0]
  print(_DEVICE + json.dumps({"platform": device.platform, "device_kind": device.device_kind}), flush=True)
  rows = run_layer_backends(smoke, steps) if what == "layer" else [run_case(what, smoke, steps, fallback, overrides)]
  for row in rows:
    print(_ROWS + json.dumps(row, default=float), flush=True)


def _report(name: str, row: dict) -> None:
  mfu_text = "unknown" if row["mfu"] is None else f"{row['mfu']:.1%}"
  print(f"  {name}{' (fallback)' if row['fallback'] else ''}: {row['median_s'] * 1e3:.1f} ms/step, "
        f"{row['tokens_per_s']:,.0f} tokens/s, MFU {mfu_text}, compile {row['compile_s']:.1f} s, {row['backends']}",
        flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, ~3 minutes on 2 cores)")
  parser.add_argument("--cases", default=",".join(CASES), help="subset of: " + ", ".join(CASES))
  parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10; smoke 2)")
  parser.add_argument("--no-layer", action="store_true", help="skip the MoE layer backends")
  parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the raw JSON goes")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every case, e.g. model.attention.xla_max_len=4096 (repeatable)")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # one case (or 'layer') in this process
  parser.add_argument("--fallback", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  steps = args.steps or (2 if args.smoke else 10)
  if args.child:
    return _child(args.child, args.smoke, steps, args.fallback, tuple(args.set))
  names = args.cases.split(",")
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
  # This process never opens the device: each case runs in a child that has it alone.
  print(f"accelerator suite{' [smoke]' if args.smoke else ''}: {', '.join(names)}", flush=True)
  overrides = tuple(args.set)
  # Every case's config up front: a bad override fails here, before any device time is spent.
  configs = {name: case_config(name, args.smoke, overrides=overrides) for name in names}
  results = Results("accelerator", params={"smoke": args.smoke, "cases": names, "steps": steps, "set": list(overrides)},
                    directory=args.results_dir)
  for name in names:
    rows, device = run_isolated(name, args.smoke, steps, overrides=overrides)
    results.add_rows([], **device)
    if "error" in rows[0] and device and any(
        k in backends_used(configs[name], device["platform"]) for k in ("tokamax", "cudnn")):
      rows += run_isolated(name, args.smoke, steps, fallback=True, overrides=overrides)[0]  # the library kernel's failure is a result too
    for row in rows:
      if "error" not in row:
        _report(name, row)
    results.add_rows(rows)
    results.write()  # after every case: a run cut short keeps what it measured
  if not args.no_layer:
    results.add_rows(run_isolated("layer", args.smoke, steps)[0])
  results.write()
  print(table(results.record))
  failed = [r.get("case", r.get("layer_backend")) for r in results.record["rows"] if "error" in r]
  if failed:
    print(f"failed: {', '.join(failed)}")
  return results.record


if __name__ == "__main__":
  record = main()
  sys.exit(1 if record and any("error" in r for r in record["rows"]) else 0)
