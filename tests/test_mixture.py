"""Weighted data mixtures (data.corpus='mixture', training/mixture.py, training/sources.py).

Each test source's documents are one repeated letter ('a' for source a, ...), so the source of
every training row (or packed piece) is read off its tokens. References: the shares
w_i / sum(w); the same pipeline restarted from a saved iterator state; a run trained straight
through; the entropy of pooled counts.
"""
import json
import os
import shutil

import numpy as np
import pytest

from configs import default, encdec, schema
from training import checkpoint as ckpt_lib
from training import data as data_lib
from training import loop, metrics, mixture, sources
from training.documents import DataError

WEIGHTS = {'a': 0.7, 'b': 0.3, 'c': 0.45, 'd': 0.0}   # d: left out; the sum is not 1
EOS = 258


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  """a, c, d: text files (one document each); b: JSONL records with the text in 'body'."""
  root = tmp_path_factory.mktemp('mixture')
  rng = np.random.default_rng(0)
  for letter in 'acd':
    os.makedirs(root / letter)
    for i in range(12):
      (root / letter / f'{i}.txt').write_text(letter * int(rng.integers(50, 400)))
  os.makedirs(root / 'b')
  with open(root / 'b' / 'records.jsonl', 'w') as f:
    for i in range(40):
      f.write(json.dumps({'body': 'b' * int(rng.integers(20, 200))}) + '\n')
  return root


def mix_config(root, weights=None, **overrides):
  """The tiny model (1 layer) on a mixture of the corpus_dir sources (seq_len 16, batch 8)."""
  c = default.get_config('tiny')
  c.data.corpus, c.data.seq_len, c.data.cache_dir = 'mixture', 16, str(root / 'cache')
  c.model.num_layers = 1   # compiles faster; the data path is the same
  c.data.mixture = {n: {'files': str(root / n / ('*.jsonl' if n == 'b' else '*.txt')),
                        'weight': w} for n, w in (weights or WEIGHTS).items()}
  if 'b' in c.data.mixture:
    c.data.mixture.b.text_field = 'body'
  c.train.update(batch_size=8, steps=6, log_every=1, eval_every=3, checkpoint_every=3,
                 warmup_steps=2)
  return schema.validate(schema.apply_overrides(c, overrides))


def source_of(tokens) -> str:
  """The letter a row (or piece) is made of."""
  letters = tokens[tokens < 256]
  assert letters.size and np.all(letters == letters[0]), 'a row mixes sources'
  return chr(int(letters[0]))


def batch_sources(batch) -> list[str]:
  return [source_of(np.concatenate([row, t[-1:]])) for row, t in zip(batch['inputs'],
                                                                    batch['targets'])]


def pipeline(cfg):
  return mixture.lm_data(cfg.data, cfg.train, pad_id=256)


def test_shares_over_1000_batches_are_within_2_percent(corpus_dir):
  cfg = mix_config(corpus_dir)
  train, evals, _ = pipeline(cfg)
  it = iter(train)
  counts = {n: 0 for n in WEIGHTS}
  for _ in range(1000):
    for s in batch_sources(next(it)):
      counts[s] += 1
  total = sum(WEIGHTS.values())
  for name, w in WEIGHTS.items():
    share = counts[name] / 8000
    assert abs(share - w / total) <= 0.02 * w / total, (name, share, w / total)
  assert counts['d'] == 0 and set(evals.sets) == {'a', 'b', 'c'}   # weight 0: left out


def test_packed_shares_of_pieces_are_within_2_percent(corpus_dir):
  cfg = mix_config(corpus_dir, **{'data.packing': True})
  train, evals, _ = pipeline(cfg)
  it = iter(train)
  counts = {n: 0 for n in WEIGHTS}
  for _ in range(300):
    batch = next(it)
    for inputs, targets, seg in zip(batch['inputs'], batch['targets'], batch['segment_ids']):
      for k in np.unique(seg[seg > 0]):
        counts[source_of(np.concatenate([inputs[seg == k], targets[seg == k]]))] += 1
  total, pieces = sum(WEIGHTS.values()), sum(counts.values())
  for name, w in WEIGHTS.items():
    assert abs(counts[name] / pieces - w / total) <= 0.02 * w / total, (name, counts)
  assert {source_of(b['targets'][0][b['weights'][0] > 0]) for b in evals.sets['b']} == {'b'}


def test_same_seed_same_batches_other_seed_other_rows_same_sources(corpus_dir):
  first = [next(it) for it in [iter(pipeline(mix_config(corpus_dir))[0])] for _ in range(20)]
  again = [next(it) for it in [iter(pipeline(mix_config(corpus_dir))[0])] for _ in range(20)]
  other = [next(it) for it in [iter(pipeline(mix_config(corpus_dir, **{'train.seed': 1}))[0])]
           for _ in range(20)]
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  # the sequence of sources is set by the weights, the rows drawn from each by the seed
  assert [batch_sources(b) for b in first] == [batch_sources(b) for b in other]
  assert any(not np.array_equal(x['inputs'], y['inputs']) for x, y in zip(first, other))


def test_zero_weight_source_changes_nothing(corpus_dir):
  """A weight-0 source is left out entirely: the batches equal a mixture without it."""
  with_d = iter(pipeline(mix_config(corpus_dir))[0])
  without = iter(pipeline(mix_config(corpus_dir, {n: w for n, w in WEIGHTS.items() if w}))[0])
  for _ in range(10):
    np.testing.assert_array_equal(next(with_d)['inputs'], next(without)['inputs'])


def test_restored_iterator_continues_the_same_sources_and_rows(corpus_dir):
  cfg = mix_config(corpus_dir)
  it = iter(pipeline(cfg)[0])
  for _ in range(37):
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
  expected = [next(it) for _ in range(25)]
  resumed = iter(pipeline(cfg)[0])
  resumed.set_state(state)
  got = [next(resumed) for _ in range(25)]
  assert [batch_sources(b) for b in got] == [batch_sources(b) for b in expected]
  for x, y in zip(got, expected):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_mixture_baseline_is_the_entropy_of_the_mixed_unigrams():
  rng = np.random.default_rng(1)
  c1, c2 = rng.integers(0, 50, 300), rng.integers(0, 50, 280)
  c2[0] += c1.sum() - c2.sum()     # equal totals: the 1:1 mixture is the pooled counts
  pooled = c1 + np.pad(c2, (0, 20))
  got = mixture.mixture_entropy({'x': c1, 'y': c2}, {'x': 0.5, 'y': 0.5})
  assert got == pytest.approx(data_lib.entropy_of_counts(pooled), rel=1e-12)


@pytest.fixture(scope='module')
def straight_run(corpus_dir, tmp_path_factory):
  """6 steps straight through (checkpoints and evaluations at 3 and 6)."""
  cfg = mix_config(corpus_dir)
  workdir = str(tmp_path_factory.mktemp('straight'))
  result = loop.train(cfg, workdir)
  return cfg, workdir, result


def test_metrics_carry_eval_loss_per_source(straight_run):
  cfg, workdir, result = straight_run
  evals = [m for m in metrics.read_metrics(workdir) if 'eval_loss' in m]
  assert [m['step'] for m in evals] == [3, 6]
  shares = {n: w / sum(WEIGHTS.values()) for n, w in WEIGHTS.items() if w}
  for m in evals:
    assert set(m) == {'step', 'eval_loss', 'eval_loss/a', 'eval_loss/b', 'eval_loss/c'}
    assert m['eval_loss'] == pytest.approx(sum(s * m[f'eval_loss/{n}'] for n, s in shares.items()))
  assert result['eval_loss/a'] == evals[-1]['eval_loss/a']
  tb = os.listdir(os.path.join(workdir, 'tb'))
  assert tb   # TensorBoard gets the same scalars (MetricsLogger writes every key)


def test_resumed_run_equals_the_straight_run(straight_run, tmp_path, capsys):
  """Resuming the straight run's step-3 checkpoint (state and data position) repeats steps 4-6."""
  cfg, straight, _ = straight_run
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(straight, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  loop.train(cfg, workdir)
  assert f'Resuming {workdir} from step 3.' in capsys.readouterr().out
  strip = lambda ms: [{k: v for k, v in m.items() if k not in ('tokens_per_sec', 'mfu')}
                      for m in ms]
  resumed = strip(metrics.read_metrics(workdir))
  assert [m['step'] for m in resumed if 'loss' in m] == [1, 2, 3, 4, 5, 6]
  assert resumed == strip(metrics.read_metrics(straight))


def test_the_saved_config_restores_the_mixture(straight_run):
  """config.json -> the same config (train.py --workdir=DIR resumes a mixture run by it)."""
  cfg, workdir, _ = straight_run
  assert ckpt_lib.load_config(workdir) == cfg


def test_changing_a_weight_on_resume_is_refused_naming_it(straight_run):
  cfg, workdir, _ = straight_run
  new = schema.apply_overrides(cfg, {'data.mixture.a.weight': 4.0})
  with pytest.raises(ckpt_lib.WorkdirError, match=r'data\.mixture\.a\.weight: 0\.7 -> 4\.0'):
    ckpt_lib.check_resume(workdir, new)


def test_a_source_without_files_is_one_error_before_compiling(corpus_dir, tmp_path, monkeypatch):
  cfg = mix_config(corpus_dir, **{'data.mixture.c.files': str(corpus_dir / 'nope' / '*.txt')})
  monkeypatch.setattr(loop, 'setup', lambda *a, **k: pytest.fail('compiled before the error'))
  with pytest.raises(DataError) as e:
    loop.train(cfg, str(tmp_path / 'run'))
  glob = str(corpus_dir / 'nope' / '*.txt')
  assert str(e.value) == f'data.mixture.c.files: {glob!r} matches no file.'
  assert not os.path.exists(tmp_path / 'run' / 'config.json')


def test_every_source_gets_its_own_cache(corpus_dir):
  cfg = mix_config(corpus_dir)
  paths = sources.ensure(cfg.data, progress=False)
  assert list(paths) == ['a', 'b', 'c'] and len(set(paths.values())) == 3
  for name, path in paths.items():
    manifest = json.load(open(os.path.join(path, 'manifest.json')))
    assert all(f'/{name}/' in f for f in manifest['files'])
    assert manifest['fields'] == ['body' if name == 'b' else 'text']


def _bad(root, overrides=None, *, mixture_=None, **fields):
  c = mix_config(root)
  with c.unlocked():
    if mixture_ is not None:
      c.data.mixture = mixture_
    for k, v in fields.items():
      c.data[k] = v
  return schema.apply_overrides(c, overrides or {})


@pytest.mark.parametrize('change, message', [
    (dict(files='x/*.txt'), "data.files='x/*.txt' is set together with data.mixture"),
    (dict(corpus='files'), "data.mixture has sources (a, b, c, d) but data.corpus='files'"),
    (dict(mixture_={}), "data.corpus='mixture' needs data.mixture"),
    (dict(overrides={'data.mixture.a.weight': -1.0}), 'data.mixture.a.weight=-1.0: must be a '
     'finite number >= 0'),
    (dict(overrides={'data.mixture.a.weight': float('inf')}), 'data.mixture.a.weight=inf'),
    (dict(mixture_={'a': {'files': 'x', 'weight': 0.0}}), 'data.mixture: every weight is 0'),
    (dict(mixture_={'a': {'files': 'x'}}), 'data.mixture.a.weight is missing'),
    (dict(mixture_={'a': {'files': '', 'weight': 1.0}}), "data.mixture.a.files='': must be"),
    (dict(mixture_={'a b': {'files': 'x', 'weight': 1.0}}), 'data.mixture.a b'),
])
def test_bad_mixture_configs_are_one_error_naming_the_field(corpus_dir, change, message):
  with pytest.raises(schema.ConfigError) as e:
    schema.validate(_bad(corpus_dir, **change))
  assert message in str(e.value)


def test_mixture_is_for_language_models(corpus_dir):
  c = encdec.get_config('tiny')
  c.data.corpus, c.data.mixture = 'mixture', mix_config(corpus_dir).data.mixture.to_dict()
  with pytest.raises(schema.ConfigError, match="data.mixture trains language models"):
    schema.validate(c)


def test_misspelt_source_key_suggests_the_field(corpus_dir):
  with pytest.raises(schema.ConfigError, match=r'did you mean `data\.mixture\.a\.weight`'):
    schema.apply_overrides(mix_config(corpus_dir), {'data.mixture.a.wieght': 1.0})


def test_an_override_naming_a_source_the_config_lacks_is_explained():
  """absl's config flags cannot add keys: `--config.data.mixture.web.files` for a config without
  a source `web` raises a bare KeyError, which train.py / prepare.py turn into this error."""
  argv = ['--config=configs/mixture.py', '--config.data.mixture.web.files=x/*.jsonl']
  err = sources.missing_source_error(argv, KeyError("'web'"))
  assert str(err).startswith("--config.data.mixture.web.files: the config has no data.mixture "
                             "source 'web'. Sources are added in a config file")
  with pytest.raises(KeyError, match='other'):
    sources.missing_source_error(argv, KeyError("'other'"))
