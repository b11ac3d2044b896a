"""The stdlib and files sources against files read independently from disk."""

import json
import os
import sysconfig

import numpy as np
import pytest

from moejax.config import base_config
from moejax.data import SOURCES, get_tokenizer
from moejax.data.text import validation_mask

BYTE = get_tokenizer("byte")


def _reference_document(text: str) -> list[int]:
  return [1] + [b + 3 for b in text.encode("utf-8")] + [2]


def _check_document(doc, text):
  assert doc["tokens"].dtype == np.int32 and doc["weights"].dtype == np.float32
  assert doc["tokens"].tolist() == _reference_document(text)
  assert doc["weights"][0] == 0 and np.all(doc["weights"][1:] == 1)


@pytest.fixture(scope="module")
def stdlib_splits():
  cfg = base_config().data
  return {split: SOURCES.get("stdlib")(cfg, split, BYTE) for split in ("train", "validation")}


def test_stdlib_splits_are_disjoint_by_file_and_cover_it(stdlib_splits):
  train, val = stdlib_splits["train"].names, stdlib_splits["validation"].names
  assert not set(train) & set(val)
  root = sysconfig.get_paths()["stdlib"]
  expected = set()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
    expected |= {os.path.relpath(os.path.join(dirpath, f), root)
                 for f in filenames if f.endswith(".py")}
  skipped = set(stdlib_splits["train"].skipped)
  assert set(train) | set(val) | skipped == expected
  assert 0.02 < len(val) / len(expected) < 0.09  # default val_fraction=0.05
  assert train == sorted(train) and val == sorted(val)
  for name in skipped:
    with open(os.path.join(root, name), "rb") as f, pytest.raises(UnicodeDecodeError):
      f.read().decode("utf-8")


def test_stdlib_documents_are_the_file_bytes(stdlib_splits):
  source = stdlib_splits["validation"]
  root = sysconfig.get_paths()["stdlib"]
  for i in range(0, len(source), max(1, len(source) // 10)):
    with open(os.path.join(root, source.names[i]), "rb") as f:
      _check_document(source[i], f.read().decode("utf-8"))


def test_validation_mask_is_a_stable_per_key_hash():
  keys = [f"dir/file_{i}.py" for i in range(4000)]
  mask = validation_mask(keys, 0.1)
  assert 0.08 < mask.mean() < 0.12
  # Adding files or reordering moves no other file.
  more = validation_mask(keys[::-1] + [f"new_{i}" for i in range(100)], 0.1)
  assert np.array_equal(more[:4000][::-1], mask)
  assert not validation_mask(keys, 0.0).any()


@pytest.mark.parametrize("n, fraction", [(2, 0.01), (2, 0.99), (5, 1e-9)])
def test_validation_mask_keeps_both_splits_nonempty(n, fraction):
  mask = validation_mask([f"k{i}" for i in range(n)], fraction)
  assert mask.any() and not mask.all()


def _write(path, content):
  path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
  return path


@pytest.fixture
def user_files(tmp_path):
  texts = {f"doc{i}.txt": f"text file {i} ünï\n" * (i + 1) for i in range(6)}
  for name, text in texts.items():
    _write(tmp_path / name, text)
  records = [{"text": f"json line {i} 🙂", "id": i} for i in range(5)]
  lines = [json.dumps(r) for r in records]
  (tmp_path / "sub").mkdir()
  _write(tmp_path / "sub" / "x.jsonl", "\n".join(lines[:3] + [""] + lines[3:]) + "\n")
  texts |= {f"sub/x.jsonl:{n}": r["text"] for n, r in zip((1, 2, 3, 5, 6), records)}
  return tmp_path, texts


def test_files_source_reads_txt_and_jsonl(user_files, data_cfg):
  root, texts = user_files
  cfg = data_cfg(source="files", files=f"{root}/*.txt, {root}/sub/*.jsonl", val_fraction=0.3, seq_len=4)
  splits = {s: SOURCES.get("files")(cfg, s, BYTE) for s in ("train", "validation")}
  seen = {}
  for source in splits.values():
    for i, name in enumerate(source.names):
      _check_document(source[i], texts[name])
      seen[name] = source
  assert set(seen) == set(texts)
  # Split by file: the jsonl lines stay together.
  assert len({id(seen[n]) for n in texts if n.startswith("sub/x.jsonl")}) == 1


def test_single_file_is_split_by_document(user_files, data_cfg):
  root, texts = user_files
  cfg = data_cfg(source="files", files=f"{root}/sub/x.jsonl", val_fraction=0.4, seq_len=4)
  train = SOURCES.get("files")(cfg, "train", BYTE).names
  val = SOURCES.get("files")(cfg, "validation", BYTE).names
  assert train and val and not set(train) & set(val)
  # Names are relative to the file's directory.
  assert sorted("sub/" + n for n in train + val) == sorted(n for n in texts if n.startswith("sub/"))


@pytest.mark.parametrize("files, content, message", [
    ("nothing*.txt", None, r"data\.files: .*nothing\*\.txt' matched no file"),
    ("e.txt", "  \n", r"data\.files: .*e\.txt holds no documents"),
    ("e.jsonl", "\n\n", r"data\.files: .*e\.jsonl holds no documents"),
    ("bad.txt", b"caf\xc3\xa9 ok \xff\xfe", r"bad\.txt is not UTF-8 .*0xff at byte offset 9"),
    ("bad.jsonl", '{"text": "a"}\n{"text": broken}\n', r"bad\.jsonl line 2 is not valid JSON"),
    ("bad.jsonl", '{"text": "a"}\n\n{"body": "b"}\n',
     r"bad\.jsonl line 3 has no string field 'text'.*jsonl_field"),
    ("bad.jsonl", '{"text": 3}\n', r"line 1 has no string field 'text'"),
    ("bad.csv", "a,b\n", r"data\.files matched .*bad\.csv.*not one of"),
    ("", None, r"data\.files is empty"),
    ("short.txt", "too short", r"data\.seq_len=256 is longer than the whole train split of data\.files \(11 tokens\)"),
])
def test_files_errors_name_the_problem(tmp_path, data_cfg, files, content, message):
  if content is not None:
    _write(tmp_path / files, content)
  cfg = data_cfg(source="files", files=str(tmp_path / files) if files else "")
  with pytest.raises(ValueError, match=message):
    SOURCES.get("files")(cfg, "train", BYTE)


@pytest.mark.parametrize("source", ["stdlib", "files"])
def test_empty_validation_split_says_how_to_fix(tmp_path, data_cfg, source):
  _write(tmp_path / "one.txt", "a single document")
  cfg = data_cfg(source=source, files=str(tmp_path / "one.txt"), val_fraction=0.0)
  with pytest.raises(ValueError, match=r"validation split .* is empty.*data\.val_fraction"):
    SOURCES.get(source)(cfg, "validation", BYTE)


def test_stdlib_packages_select_top_level_packages(data_cfg):
  cfg = data_cfg(source="stdlib", stdlib_packages="email,json", val_fraction=0.2)
  names = SOURCES.get("stdlib")(cfg, "train", BYTE).names + SOURCES.get("stdlib")(cfg, "validation", BYTE).names
  assert names and {n.split("/")[0] for n in names} == {"email", "json"}
  with pytest.raises(ValueError, match=r"data\.stdlib_packages names \['nopkg'\]"):
    SOURCES.get("stdlib")(data_cfg(source="stdlib", stdlib_packages="nopkg"), "train", BYTE)
