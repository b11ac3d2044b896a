"""``moejax COMMAND --help``: each command's purpose, its own flags and examples; unknown-command hints."""

from __future__ import annotations

import difflib

CONFIG_FLAGS = """  --config FILE.py[:ARG]  the config (configs/*.py); --config.FIELD=VALUE overrides one field
  --workdir DIR           the run directory (default: workdirs/<config name>)"""

# command -> (what it does, examples)
COMMANDS = {
    "train": ("Train a model, or resume it from the newest readable checkpoint in --workdir. Prints where it "
              "starts (resumed from step N / starting fresh / already finished) and a closing summary.",
              ["moejax train --config configs/tiny.py --workdir workdirs/tiny",
               "moejax train --config configs/tiny.py --workdir workdirs/tiny --config.train.steps=200",
               "moejax train --config configs/tiny.py --workdir workdirs/tiny --start_fresh"]),
    "eval": ("Evaluate the newest checkpoint of --workdir on the validation split (writes WORKDIR/eval.json), or "
             "run a long-context task. Without --config it reads WORKDIR/config.json.",
             ["moejax eval --workdir workdirs/tiny",
              "moejax eval --workdir workdirs/tiny --task passkey --lengths 256,1024 --depths 0,0.5,1"]),
    "generate": ("Continue prompts with the newest checkpoint of --workdir (streamed for one prompt; several "
                 "prompts are labelled). Without --config it reads WORKDIR/config.json.",
                 ['moejax generate --workdir workdirs/tiny --prompt "def main(" --temperature 0.8',
                  'moejax generate --workdir workdirs/tiny --prompt "import os" --prompt "class A" --temperature 0']),
    "sweep": ("Train every run of a sweep (arms x trials x seeds, resumable) and compare the arms. "
              "--config.FIELD=VALUE overrides apply to every run on top of the sweep file's settings "
              "(a field an arm fixes or tunes is refused); --quick tries it in minutes.",
              ["moejax sweep --config configs/tiny.py --sweep experiments/sweeps/optimizers.py --quick",
               "moejax sweep --config configs/tiny.py --sweep experiments/sweeps/optimizers.py --parallel 2"]),
    "distill": ("Train each domain's specialist, then distill them into the student; writes distill_report.md.",
                ["moejax distill --config configs/distill_tiny.py --workdir workdirs/distill_tiny"]),
    "convert": ("Convert between Hugging Face checkpoints and moejax workdirs (--to-hf reads "
                "WORKDIR/config.json).",
                ["moejax convert --from-hf path/to/hf_checkpoint --out workdirs/converted",
                 "moejax convert --to-hf workdirs/tiny --out workdirs/tiny-hf"]),
    "data": ("Tokenize a corpus once into ArrayRecord shards with a manifest (parallel, resumable) for "
             "--config.data.source=array_record; see docs/data.md.",
             ["moejax data prepare --input 'corpus/*.jsonl' --tokenizer byte --out data/corpus --workers 4"]),
    "compile": ("Compile the train step ahead of time for an unattached TPU topology (needs libtpu: pip install -e "
                "'.[tpu]'); prints HBM per device, FLOPs, collectives and a roofline step time; exit 2 when it "
                "does not fit. See docs/sharding.md.",
                ["moejax compile --config configs/tiny_moe.py --topology v5p:2x2x1 --config.mesh.data=1 "
                 "--config.mesh.expert=4"]),
    "config": ("Print the resolved config (the file, its variant and every --config.FIELD=VALUE override) as "
               "JSON, after validating it.",
               ["moejax config --config configs/tiny_moe.py --config.model.moe.num_experts=16"]),
}


def command_help(command: str, fv=None) -> str:
  """The help of one command: purpose, flags (its own, from ``fv``, then --config/--workdir), examples."""
  what, examples = COMMANDS[command]
  lines = [f"usage: moejax {command} [flags]", "", what, "", "flags:"]
  if fv is not None:
    for name in sorted(fv):
      flag = fv[name]
      if name in ("config", "workdir", "flagfile", "undefok", "help"):
        continue
      default = "" if flag.default in (None, [], "") else f" (default: {flag.default_as_str or flag.default})"
      lines.append(f"  --{name:<22} {flag.help}{default}")
  if command != "convert":
    lines.append(CONFIG_FLAGS)
  lines += ["", "examples:", *(f"  {e}" for e in examples)]
  return "\n".join(lines)


def unknown_command(name: str, commands) -> str:
  """``unknown command 'trian'; did you mean 'train'?`` (or the list of commands)."""
  close = difflib.get_close_matches(name, list(commands), n=1, cutoff=0.5)
  hint = f"did you mean '{close[0]}'?" if close else f"the commands are {', '.join(commands)}."
  return f"moejax: unknown command '{name}'; {hint} (moejax --help lists them; moejax COMMAND --help for one)"
