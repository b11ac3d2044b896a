"""Loading a Hugging Face checkpoint: time and peak host memory, streaming vs load-everything.

  python benchmarks/interop_load.py [--layers 6] [--d-model 512] [--experts 32] [--dtype bfloat16]

Writes one random Qwen3-MoE checkpoint (``save_pretrained``, bf16, sharded at
100 MB) into a temporary directory, then in a fresh process each:

* ``stream``  ``moejax.interop.hf.load``: one tensor at a time from the
  memory-mapped safetensors files, cast, ``device_put`` (what moejax does);
* ``naive``   the baseline: the whole state dict read into host memory first
  (``safetensors.torch.load_file`` of every shard), then mapped the same way —
  two copies of the model at the peak;
* ``imports`` the same imports and nothing else: the process's floor.

Reported: wall seconds of the load, resident memory just before it (imports
done, backend up), the peak (``VmHWM``), and the growth as a ratio to the
size of the loaded arrays (1.0 = nothing but the result was ever resident).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from moejax.benchmarking import Results, interleaved


def _rss_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _child(method: str, directory: str, dtype: str) -> dict:
  import jax
  import numpy as np
  import safetensors.torch  # noqa: F401  (torch too: every method pays for the same imports)

  from moejax.interop import hf

  jax.block_until_ready(jax.device_put(np.zeros(1)))  # the backend is up before the clock starts
  before = _rss_mb("VmRSS")
  start = time.perf_counter()
  if method == "stream":
    _, variables = hf.load(directory, dtype=dtype)
  elif method == "naive":
    from safetensors.torch import load_file

    from moejax.models.transformer import build_model

    with open(os.path.join(directory, "config.json")) as f:
      hf_config = json.load(f)
    state = {}
    for name in sorted(os.listdir(directory)):
      if name.endswith(".safetensors"):
        state.update(load_file(os.path.join(directory, name)))
    cfg = hf.config_from_hf(hf_config)
    cfg.model.dtype = cfg.model.param_dtype = dtype
    variables = hf._place(hf._StateDictReader(state), build_model(cfg.model), hf_config["model_type"])
  else:
    variables = {}
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - start
  n_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(variables))
  return {"method": method, "seconds": seconds, "before_mb": before, "peak_rss_mb": _rss_mb("VmHWM"),
          "loaded_mb": n_bytes / 2**20}


def _checkpoint(directory: str, layers: int, d: int, experts: int) -> float:
  import torch
  import transformers

  cfg = transformers.Qwen3MoeConfig(vocab_size=32000, hidden_size=d, num_hidden_layers=layers, num_attention_heads=8,
                                    num_key_value_heads=4, moe_intermediate_size=d // 2, num_experts=experts,
                                    num_experts_per_tok=4, intermediate_size=2 * d)
  model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
  model.save_pretrained(directory, max_shard_size="100MB")
  return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
             if n.endswith(".safetensors")) / 2**20


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--rounds", type=int, default=3, help="fresh processes per method, interleaved")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child[0], args.child[1], args.dtype)))
    return
  results = Results("interop_load", params={k: v for k, v in vars(args).items() if k != "child"})
  methods = ("imports", "stream", "naive")
  with tempfile.TemporaryDirectory() as directory:
    size_mb = _checkpoint(directory, args.layers, args.d_model, args.experts)
    print(f"checkpoint: Qwen3-MoE {args.layers} layers, d={args.d_model}, {args.experts} experts; "
          f"{size_mb:.0f} MB of bf16 safetensors; loading as {args.dtype}")
    runs = {m: [] for m in methods}

    def load(method):
      def run():
        out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--child", method, directory],
                             check=True, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        return runs[method][-1]["seconds"]
      return run

    interleaved({m: load(m) for m in methods}, args.rounds)
  results.add_rows([{"method": m, "runs": runs[m]} for m in methods], checkpoint_mb=size_mb)
  results.write()
  print(table(results.record))


def table(record: dict) -> str:
  """Markdown: medians over the rounds of each method (``benchmarks/report.py``)."""
  med = lambda runs, key: statistics.median(r[key] for r in runs)
  rows = {r["method"]: r["runs"] for r in record["rows"]}
  lines = ["| method | load s | RSS before MB | peak RSS MB | peak - before MB | (peak - before) / loaded |",
           "|---|---|---|---|---|---|"]
  for method in ("stream", "naive"):
    runs = rows[method]
    above = statistics.median(r["peak_rss_mb"] - r["before_mb"] for r in runs)
    lines.append(f"| {method} | {med(runs, 'seconds'):.2f} | {med(runs, 'before_mb'):.0f} | "
                 f"{med(runs, 'peak_rss_mb'):.0f} | {above:.0f} | {above / med(runs, 'loaded_mb'):.2f} |")
  lines.append(f"\nMedians of {len(rows['stream'])} fresh processes per method, interleaved; imports only: peak "
               f"{med(rows['imports'], 'peak_rss_mb'):.0f} MB; loaded arrays: {med(rows['stream'], 'loaded_mb'):.0f} MB.")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
