"""Corpus loading, the held-out split, batching and the tokenizer."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import encdec, schema
from tests.conftest import ROOT
from training import data as data_lib
from training import loop, metrics, seq2seq_data
from text.tokenizer import ByteTokenizer


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


def _jsonl_corpus(tmp_path, n=60):
  rng = np.random.default_rng(0)
  with open(tmp_path / 'docs.jsonl', 'w') as f:
    for i in range(n):
      f.write(json.dumps({'text': f'doc {i}: ' + 'ab' * int(rng.integers(1, 40))}) + '\n')
  return {'data.corpus': 'files', 'data.files': str(tmp_path / 'docs.jsonl'),
          'data.cache_dir': str(tmp_path / 'cache'), 'data.prepare_workers': 1,
          'data.eval_percent': 20.0, 'data.packing': True}


def test_packed_rows_are_cached_training_documents(tiny_config, tmp_path):
  cfg = tiny_config({**_jsonl_corpus(tmp_path), 'data.seq_len': 32})
  train_ds, evals, _ = data_lib.lm_data(cfg.data, cfg.train, pad_id=256)
  corpus = data_lib.load_corpus(cfg.data)
  tok = ByteTokenizer()
  words = lambda tokens: ' ' + ' '.join(map(str, tokens)) + ' '
  split = {}
  for name in ('train', 'eval'):   # each document as [EOS] + tokens + [EOS], in words
    docs = corpus.cache.documents(name)
    split[name] = {words([tok.eos_id, *docs[i], tok.eos_id]) for i in range(len(docs))}
  assert split['train'] and split['eval'] and not split['train'] & split['eval']
  for batches, name in (([next(iter(train_ds))], 'train'), (evals, 'eval')):
    for b in batches:
      assert set(b) == {'inputs', 'targets', 'weights', 'segment_ids', 'positions'}
      for row in range(b['inputs'].shape[0]):
        for seg in set(b['segment_ids'][row].tolist()) - {0}:
          at = b['segment_ids'][row] == seg
          np.testing.assert_array_equal(b['positions'][row][at], np.arange(at.sum()))
          np.testing.assert_array_equal(b['inputs'][row][at][1:], b['targets'][row][at][:-1])
          piece = words(b['inputs'][row][at])   # a piece of one document of this split
          assert sum(piece in d for d in split[name]) >= 1


@pytest.mark.slow
def test_packed_resume_on_cached_data_is_exact(tiny_config, tmp_path):
  cfg = tiny_config({**_jsonl_corpus(tmp_path), 'train.log_every': 1, 'train.steps': 8,
                     'train.checkpoint_every': 4, 'train.eval_every': 4,
                     'model.num_layers': 1})   # compiles faster; the data path is the same
  loop.train(cfg, str(tmp_path / 'a'))
  loop.train(cfg, str(tmp_path / 'b'), stop_after=4)
  loop.train(cfg, str(tmp_path / 'b'))
  losses = lambda d: [(m['step'], m.get('loss'), m.get('eval_loss'))
                      for m in metrics.read_metrics(str(tmp_path / d))]
  assert [s for s, loss, _ in losses('b') if loss is not None] == list(range(1, 9))
  assert losses('a') == losses('b')


def test_packed_pairs_keep_each_source_with_its_target():
  cfg = schema.apply_overrides(encdec.get_config('reversal,tiny'), {'data.packing': True})
  tok = ByteTokenizer()
  batch = next(iter(seq2seq_data.load(cfg, tok).train))
  assert {'source_segment_ids', 'source_positions', 'segment_ids', 'positions'} <= set(batch)
  pairs = 0
  for row in range(batch['sources'].shape[0]):
    for seg in set(batch['segment_ids'][row].tolist()) - {0}:
      src = batch['sources'][row][batch['source_segment_ids'][row] == seg]
      tgt = batch['targets'][row][batch['segment_ids'][row] == seg]
      assert src[-1] == tgt[-1] == tok.eos_id
      assert tok.decode(tgt[:-1]) == tok.decode(src[:-1])[::-1]   # the reversal task
      pairs += 1
  assert pairs > batch['sources'].shape[0]   # more than one pair a row
