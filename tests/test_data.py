"""Corpus loading, the held-out split, batching and the tokenizer."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from training import data as data_lib
from training.tokenizer import ByteTokenizer


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = 'def f(x):\n    return "héllo ✓"\n'
  ids = tok.encode(text)
  assert ids.max() < 256 and len(ids) == len(text.encode())
  assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id]])) == text


def test_stdlib_split_is_by_path_hash(tiny_config):
  cfg = tiny_config().data
  files = data_lib.corpus_files(cfg)
  names = [n for _, n in files]
  assert 'os.py' in names and not any(n.startswith('site-packages') for n in names)
  held = {n for n in names
          if int(hashlib.sha1(n.encode()).hexdigest()[:8], 16) % 10_000 < cfg.eval_percent * 100}
  assert {n for n in names if data_lib.is_held_out(n, cfg.eval_percent)} == held
  assert 0.005 < len(held) / len(names) < 0.05
  corpus = data_lib.load_corpus(cfg)
  assert corpus.num_files['eval'] == len([n for n in held if os.path.getsize(
      os.path.join(data_lib.stdlib_root(), n))])
  assert corpus.train.size > 100 * corpus.eval.size / 10


def _files_cfg(tiny_config, files, **kw):
  return tiny_config({'data.corpus': 'files', 'data.files': files,
                      **{f'data.{k}': v for k, v in kw.items()}}).data


def test_user_files_and_single_file_fallback(tiny_config, tmp_path):
  (tmp_path / 'a.txt').write_text('hello world ' * 200)
  corpus = data_lib.load_corpus(_files_cfg(tiny_config, str(tmp_path / '*.txt')))
  total = corpus.train.size + corpus.eval.size
  assert total == 2401 and corpus.eval.size >= 65   # one file: the stream's tail is held out


def test_missing_and_empty_data_are_clear_errors(tiny_config, tmp_path):
  with pytest.raises(data_lib.DataError, match=r"data.files: '.*nope\*.txt' matches no file"):
    data_lib.load_corpus(_files_cfg(tiny_config, str(tmp_path / 'nope*.txt')))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(data_lib.DataError, match='data.files: the corpus has 0 tokens in 1 file'):
    data_lib.load_corpus(_files_cfg(tiny_config, str(tmp_path / 'empty.txt')))


def test_missing_data_file_cli_error_before_compile(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/default.py:tiny', f'--workdir={workdir}',
       '--config.data.corpus=files', f'--config.data.files={tmp_path}/missing.txt'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: data.files: '{tmp_path}/missing.txt' matches no file.")
  assert not workdir.exists()


def test_batches_shift_targets_and_shard_over_processes():
  tokens = np.arange(10_000, dtype=np.int32)
  one = next(iter(data_lib.train_dataset(tokens, 16, 8, seed=3)))
  np.testing.assert_array_equal(one['inputs'][:, 1:], one['targets'][:, :-1])
  np.testing.assert_array_equal(one['targets'][:, -1], one['inputs'][:, -1] + 1)
  halves = [next(iter(data_lib.train_dataset(tokens, 16, 8, seed=3, process_index=i,
                                             process_count=2))) for i in range(2)]
  rows = lambda b: sorted(map(tuple, b['inputs']))
  assert rows(one) == sorted(rows(halves[0]) + rows(halves[1]))


def test_eval_batches_pad_with_zero_weights():
  tokens = np.arange(16 * 5 + 1, dtype=np.int32)   # exactly 5 windows of 16
  batches = data_lib.eval_batches(tokens, 16, 4, num_batches=3)
  assert len(batches) == 2
  assert batches[1]['weights'][:1].all() and not batches[1]['weights'][1:].any()
  seen = np.concatenate([b['inputs'][b['weights'][:, 0] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen[:, 0]), np.arange(0, 80, 16))


def test_unigram_entropy_formula():
  tokens = np.array([0] * 50 + [1] * 25 + [2] * 25)
  assert data_lib.unigram_entropy(tokens) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))
