"""The ``moejax`` command: ``moejax COMMAND --config FILE[:ARG] [--config.a.b=v ...]``.

  moejax train --config configs/tiny.py --workdir workdirs/tiny --config.train.steps=200
  moejax eval  --config configs/tiny.py --workdir workdirs/tiny
  moejax generate --config configs/tiny.py --workdir workdirs/tiny --prompt "def main(" --temperature 0.8
  moejax sweep --config configs/tiny.py --sweep experiments/sweeps/optimizers.py
  moejax distill --config configs/distill_tiny.py --workdir workdirs/distill_tiny
  moejax convert --from-hf path/to/hf_checkpoint --out workdirs/converted [--dtype bfloat16]
  moejax convert --to-hf workdirs/converted --out path/to/hf_out
  moejax data prepare --input 'corpus/*.jsonl' --tokenizer byte --out data/corpus [--workers 4]
  moejax compile --config configs/v4_flash.py --topology v5p:4x4x8 --config.mesh.fsdp=-1

Config overrides use ml-collections' dotted flags; an unknown or ill-typed
field is an error. All logic lives in the library (``moejax.train``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

USAGE = """usage: moejax COMMAND --config configs/FILE.py[:ARG] [--workdir DIR] [--config.FIELD=VALUE ...]

commands:
  train   train (or resume) a model; leaves checkpoints, metrics.jsonl,
          TensorBoard events and config.json in --workdir
  eval    evaluate the latest checkpoint in --workdir on the validation split, or
          with --task passkey|needle|needle_multi|mqar|perplexity [--lengths 256,1024]
          [--depths 0,0.5,1] [--samples 8]: a depth x length table and heatmap in
          WORKDIR/evals/
  distill train each domain's specialist (resumable), then distill them into the
          student over the full vocabulary; leaves teachers/<domain>/, the student's
          checkpoints and metrics.jsonl, and distill_report.md in --workdir
  generate --prompt "..." [--prompt ...] [--prompt_file F] [--max_new_tokens N]
          [--temperature T --top_k K --top_p P --seed S --prefill_chunk C]: continue
          the prompts with the latest checkpoint in --workdir, streamed to stdout
  sweep   --sweep FILE [--parallel N]: train every run of a sweep (arms x trials x
          seeds, resumable) under --workdir (default workdirs/sweep-<FILE name>) and
          write results.csv, results.md and plots comparing the arms
  config  --config FILE [--config.FIELD=VALUE ...]: print the resolved, validated config
  convert --from-hf DIR --out WORKDIR [--dtype float32|bfloat16|float16]: a Hugging Face
          checkpoint (DeepSeek-V3/V3.2/V4, GLM-4-MoE, Qwen3-MoE, Mixtral, Qwen3, Llama) -> WORKDIR/config.py,
          config.json and an Orbax checkpoint that train/eval resume from
          --to-hf WORKDIR --out DIR [--model-type T] [--dtype D]: the newest checkpoint
          of WORKDIR -> config.json + safetensors that transformers loads
  data    prepare --input GLOBS --tokenizer T --out DIR [--format jsonl|txt|parquet]
          [--field text] [--workers N]: tokenize a corpus once into ArrayRecord shards
          (resumable) for --config.data.source=array_record --config.data.path=DIR
  compile --topology v5p:2x2x1: compile the train step ahead of time for a TPU topology
          (needs libtpu: pip install -e .[tpu]) and print HBM per device, FLOPs,
          collectives and a roofline step time; exit 2 when it does not fit

moejax COMMAND --help lists a command's flags and examples. eval, generate and
convert --to-hf read WORKDIR/config.json when --config is not given.
"""


def _flag_values(argv: list[str], define_flags=None) -> flags.FlagValues:
  fv = flags.FlagValues()
  if define_flags:
    define_flags(fv)
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py[:variant]",
                                  flag_values=fv, lock_config=True, sys_argv=["moejax", *argv])
  flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<config name>)", flag_values=fv)
  return fv


def _parse(command: str, argv: list[str], define_flags=None, config_from_workdir: bool = False):
  """(config, workdir, flag values); ``define_flags(fv)`` adds a command's own flags.

  ``config_from_workdir``: without --config, read WORKDIR/config.json (the run's own config).
  """
  fv = _flag_values(argv, define_flags)
  try:
    fv(["moejax " + command, *argv])
    cfg = fv["config"].value
    saved = os.path.join(fv["workdir"].value or "", "config.json")
    if cfg is None and config_from_workdir and fv["workdir"].value and os.path.exists(saved):
      from moejax.interop.hf import workdir_config

      print(f"moejax {command}: using config {saved} (no --config given)", file=sys.stderr)
      return workdir_config(fv["workdir"].value), fv["workdir"].value, fv
    if cfg is None:
      raise flags.Error("--config is required, e.g. --config configs/tiny.py"
                        + (" (or --workdir of a run, whose config.json is used)" if config_from_workdir else ""))
    cfg.get("model")  # ml-collections defers a failed load to the first access
  except OSError as err:  # ml-collections could not read or run the config file
    raise flags.Error(f"cannot load the --config file: {err}") from None
  except (AttributeError, KeyError) as err:  # ml-collections' error for a field that does not exist
    raise flags.Error(_unknown_field_message(argv, str(err))) from None
  workdir = fv["workdir"].value or _default_workdir(fv["config"].config_filename)
  if command != "train":
    print(f"moejax {command}: using config {fv['config'].config_filename}", file=sys.stderr)
  return cfg, workdir, fv


def _unknown_field_message(argv: list[str], error: str) -> str:
  """Names the override that does not exist, with ml-collections' suggestion."""
  overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
  names = re.findall(r"[A-Za-z_][A-Za-z_0-9]*", error)
  bad = [o for o in overrides if o.rsplit(".", 1)[-1] in names] or overrides
  hint = re.search(r'Did you mean "([^"]+)"', error)
  suggestion = f' Did you mean "{hint.group(1)}"?' if hint else ""
  return f"unknown config field {', '.join(bad)}.{suggestion} (see moejax/config.py for all fields)"


def _default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", name + (f"-{variant}" if variant else ""))


def _train_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_boolean("start_fresh", False, "when every checkpoint in --workdir is unreadable: set them aside "
                       "and train from step 0 (without it, the run stops and changes nothing)", flag_values=fv)


def cmd_train(argv: list[str]) -> int:
  from moejax.console import check_workdir
  from moejax.validation import validate
  from moejax.distributed import initialize
  from moejax.train import train

  cfg, workdir, fv = _parse("train", argv, _train_flags)
  validate(cfg)  # what can be checked before the devices are known
  check_workdir(workdir)
  initialize(cfg.distributed)
  print(f"moejax train: workdir {workdir}, config {fv['config'].config_filename}", file=sys.stderr)
  train(cfg, workdir, start_fresh=fv["start_fresh"].value)
  return 0


def cmd_distill(argv: list[str]) -> int:
  from moejax.validation import validate
  from moejax.distill.run import run_distill

  cfg, workdir, _ = _parse("distill", argv)
  validate(cfg)
  print(f"moejax distill: workdir {workdir}", file=sys.stderr)
  run_distill(cfg, workdir)
  with open(os.path.join(workdir, "distill_report.md")) as f:
    print(f.read())
  return 0


def _eval_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("task", None, "long-context task: passkey, needle, needle_multi, mqar or "
                      "perplexity (default: validation loss)", flag_values=fv)
  flags.DEFINE_list("lengths", ["256", "512", "1024"], "context lengths in tokens", flag_values=fv)
  flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "needle depths (fractions)", flag_values=fv)
  flags.DEFINE_integer("samples", 8, "examples per cell (windows for perplexity)", flag_values=fv)


def cmd_eval(argv: list[str]) -> int:
  from moejax.evals import long_context
  from moejax.train import evaluate_checkpoint

  cfg, workdir, fv = _parse("eval", argv, _eval_flags, config_from_workdir=True)
  if fv["task"].value is None:
    results = evaluate_checkpoint(cfg, workdir)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0
  try:
    lengths = [int(n) for n in fv["lengths"].value]
    depths = [float(d) for d in fv["depths"].value]
  except ValueError as err:
    raise flags.Error(f"--lengths takes integers and --depths fractions: {err}") from None
  result = long_context.run(cfg, workdir, fv["task"].value, lengths, depths, fv["samples"].value)
  with open(result["files"]["markdown"]) as f:
    print(f.read())
  print("wrote " + ", ".join(result["files"].values()), file=sys.stderr)
  return 0


def _generate_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for a batch)", flag_values=fv)
  flags.DEFINE_string("prompt_file", None, "a file whose whole text is one more prompt", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate per prompt", flag_values=fv)
  flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0 = greedy", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling: the smallest set with this probability", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
  flags.DEFINE_integer("prefill_chunk", 256, "prompt tokens per prefill step", flag_values=fv)


def cmd_generate(argv: list[str]) -> int:
  from moejax.generate import generate_text

  cfg, workdir, fv = _parse("generate", argv, _generate_flags, config_from_workdir=True)
  prompts = list(fv["prompt"].value)
  if fv["prompt_file"].value:
    with open(fv["prompt_file"].value) as f:
      prompts.append(f.read())
  if not prompts:
    raise flags.Error('give --prompt "..." (repeatable) or --prompt_file FILE')
  generate_text(cfg, workdir, prompts, out=sys.stdout, max_new_tokens=fv["max_new_tokens"].value,
                temperature=fv["temperature"].value, top_k=fv["top_k"].value, top_p=fv["top_p"].value,
                seed=fv["seed"].value, prefill_chunk=fv["prefill_chunk"].value)
  return 0


def _sweep_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("sweep", None, "sweep file, e.g. experiments/sweeps/optimizers.py", flag_values=fv)
  flags.DEFINE_integer("parallel", 1, "runs at a time, each in its own process", flag_values=fv)
  flags.DEFINE_boolean("quick", False, "a small version to try in minutes: one trial per arm (each grid's middle "
                       "value), the first seed, no budget runs, 60 steps", flag_values=fv)


def _overrides(cfg, argv: list[str]) -> dict:
  """{"train.steps": 50, ...}: the --config.FIELD=VALUE overrides given, with their parsed values."""
  out = {}
  for arg in argv:
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      value = cfg
      for key in field.split("."):
        value = value[key]
      out[field] = value
  return out


def cmd_sweep(argv: list[str]) -> int:
  from moejax.sweep import run_sweep

  cfg, _, fv = _parse("sweep", argv, _sweep_flags)
  if not fv["sweep"].value:
    raise flags.Error("--sweep is required, e.g. --sweep experiments/sweeps/optimizers.py")
  name = os.path.splitext(os.path.basename(fv["sweep"].value))[0]
  workdir = fv["workdir"].value or os.path.join("workdirs", f"sweep-{name}")
  progress = logging.getLogger("moejax.sweep")
  progress.addHandler(logging.StreamHandler())
  progress.setLevel(logging.INFO)
  progress.propagate = False
  run_sweep(cfg, fv["sweep"].value, workdir, fv["parallel"].value, command="moejax sweep " + " ".join(argv),
            overrides=_overrides(cfg, argv), quick_run=fv["quick"].value)
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read())
  return 0


def cmd_convert(argv: list[str]) -> int:
  import argparse

  from moejax.interop import hf

  from moejax.cli_help import COMMANDS as HELP

  parser = argparse.ArgumentParser(prog="moejax convert", description=HELP["convert"][0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="examples:\n" + "\n".join(f"  {e}" for e in HELP["convert"][1]))
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from-hf", metavar="DIR", help="a local HF checkpoint (config.json + *.safetensors)")
  direction.add_argument("--to-hf", metavar="WORKDIR", help="a moejax workdir (its newest checkpoint)")
  parser.add_argument("--out", required=True, help="the workdir (--from-hf) or HF directory (--to-hf) to write")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                      help="parameter dtype (--from-hf, default float32) / stored dtype (--to-hf, default the model's)")
  parser.add_argument("--model-type", default=None, help="--to-hf: the HF model_type (default: inferred)")
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_:
    return int(exit_.code or 0)
  logging.basicConfig(level=logging.INFO, format="moejax convert: %(message)s")
  if args.from_hf:
    config_py = hf.convert_from_hf(args.from_hf, args.out, dtype=args.dtype or "float32")
    print(f"wrote {args.out}; fine-tune with: moejax train --config {config_py} --workdir {args.out}")
  else:
    print(f"moejax convert: using config {os.path.join(args.to_hf, 'config.json')}", file=sys.stderr)
    files = hf.convert_to_hf(args.to_hf, args.out, model_type=args.model_type, dtype=args.dtype)
    print(f"wrote {args.out}: config.json, {', '.join(files)}")
  return 0


def cmd_data(argv: list[str]) -> int:
  if argv[:1] != ["prepare"]:
    raise flags.Error("usage: moejax data prepare --input GLOBS --tokenizer T --out DIR (see docs/data.md)")
  from moejax.data.prepare import main as prepare_main
  return prepare_main(argv[1:])


def cmd_config(argv: list[str]) -> int:
  from moejax.config import to_json
  from moejax.validation import validate

  cfg, _, _ = _parse("config", argv)
  validate(cfg)
  print(to_json(cfg))
  return 0


def cmd_compile(argv: list[str]) -> int:
  from moejax import aot

  def define(fv):
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:2x2x1 or v5p:4x4x8", flag_values=fv)

  cfg, _, fv = _parse("compile", argv, define)
  if not fv["topology"].value:
    raise flags.Error("--topology is required, e.g. --topology v5p:2x2x1")
  try:
    aot.chip_of(fv["topology"].value)
  except ValueError as err:
    raise flags.Error(str(err)) from None
  try:
    report = aot.compile_train_step(cfg, fv["topology"].value)
    print(report)
    aot.check_fits(report)
  except aot.DoesNotFit as err:
    print(f"moejax compile: does not fit: {err}", file=sys.stderr)
    return 2
  return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "sweep": cmd_sweep,
            "convert": cmd_convert, "distill": cmd_distill, "config": cmd_config, "data": cmd_data,
            "compile": cmd_compile}
FLAGS = {"train": _train_flags, "eval": _eval_flags, "generate": _generate_flags, "sweep": _sweep_flags}


def main(argv: list[str] | None = None) -> int:
  from moejax import cli_help

  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE, file=sys.stderr)
    return 0 if argv else 2
  if argv[0] not in COMMANDS:
    print(cli_help.unknown_command(argv[0], COMMANDS), file=sys.stderr)
    return 2
  if argv[0] != "convert" and ("--help" in argv or "-h" in argv):
    print(cli_help.command_help(argv[0], _flag_values([], FLAGS.get(argv[0]))))
    return 0
  from moejax.checkpoint import CheckpointMismatchError, UnreadableCheckpointsError
  from moejax.config import ConfigError
  from moejax.train import NonFiniteError

  try:
    return COMMANDS[argv[0]](argv[1:])
  except (flags.Error, ConfigError, CheckpointMismatchError, UnreadableCheckpointsError, FileNotFoundError,
          KeyError, NotImplementedError, ImportError) as err:
    print(f"moejax {argv[0]}: error: {err}", file=sys.stderr)
    return 2
  except NonFiniteError as err:
    print(f"moejax {argv[0]}: stopped: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
