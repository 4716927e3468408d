"""Sweep statistics (summary.csv against scipy on the raw per-trial numbers), seeds needed (against
a simulation), scaling fits (a known exponent recovered), --compare, and bad sweep files."""
import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as sps

from sweeps import compare, report, runner, scaling, spec, stats
from tests.test_sweeps import TINY, sweep_cli, write_sweep

GROUPS = [{'model.num_kv_heads': 1}, {'model.num_kv_heads': 2}, {'model.num_kv_heads': 4}]
SEEDS = [0, 1, 2, 3]


def write_run(directory, evals, train_loss, speeds, status='done'):
  """A synthetic trial: metrics.jsonl with eval lines at `evals` [(step, loss)], train lines
  carrying `train_loss` and one tokens/s per eval step."""
  with open(os.path.join(directory, 'metrics.jsonl'), 'w') as f:
    for (step, loss), speed in zip(evals, speeds):
      f.write(json.dumps({'step': step, 'loss': train_loss, 'tokens_per_sec': speed}) + '\n')
      f.write(json.dumps({'step': step, 'eval_loss': loss}) + '\n')
  path = os.path.join(directory, 'trial.json')
  info = runner.read_json(path, {})
  info.update(status=status, wall_time=1.0, error=None)
  runner.write_json(path, info)


@pytest.fixture(scope='module')
def seeded(tmp_path_factory):
  """A 3-group x 4-seed sweep with synthetic results: group 1 (kv=2) clearly lower than the
  baseline (kv=4), group 0 (kv=1) the same as the baseline."""
  tmp = tmp_path_factory.mktemp('stats')
  path = write_sweep(tmp, 's', GROUPS, seeds=SEEDS, baseline={'model.num_kv_heads': 4})
  sweep = spec.load(path)
  workdir = str(tmp / 'out')
  runner.prepare(workdir, sweep)
  rng = np.random.default_rng(0)
  centre = {1: 3.0, 2: 2.8, 4: 3.0}
  raw = {}
  for t in sweep.trials:
    kv = t.overrides['model.num_kv_heads']
    final = centre[kv] + rng.normal(0, 0.03)
    train = final - 0.1 + rng.normal(0, 0.02)
    speeds = rng.normal(1000 * kv, 50, size=2)
    write_run(runner.trial_dir(workdir, t), [(100, final + 0.5), (200, final)], train, speeds)
    raw.setdefault(kv, {'eval_loss': [], 'train_loss': [], 'tokens_per_sec': []})
    raw[kv]['eval_loss'].append(final)
    raw[kv]['train_loss'].append(train)
    raw[kv]['tokens_per_sec'].append(float(np.mean(speeds)))
  report.write_report(workdir)
  with open(os.path.join(workdir, 'summary.csv')) as f:
    table = list(csv.DictReader(f))
  return workdir, raw, table


def welch_by_hand(x, b):
  """Welch's difference interval and p-value from the textbook formulas."""
  x, b = np.asarray(x), np.asarray(b)
  v1, v2 = x.var(ddof=1) / len(x), b.var(ddof=1) / len(b)
  df = (v1 + v2) ** 2 / (v1 ** 2 / (len(x) - 1) + v2 ** 2 / (len(b) - 1))
  diff, se = x.mean() - b.mean(), math.sqrt(v1 + v2)
  half = sps.t.ppf(0.975, df) * se
  return diff, diff - half, diff + half, 2 * sps.t.sf(abs(diff) / se, df)


def test_summary_csv_matches_scipy_on_raw_numbers(seeded):
  workdir, raw, table = seeded
  assert list(table[0])[:10] == ['group', 'n', 'eval_loss_mean', 'eval_loss_ci95_low',
                                 'eval_loss_ci95_high', 'diff_vs_baseline', 'diff_ci95_low',
                                 'diff_ci95_high', 'p_value', 'seeds_needed']
  assert [r['group'] for r in table] == ['num_kv_heads=1', 'num_kv_heads=2', 'num_kv_heads=4']
  base = raw[4]
  for row, kv in zip(table, (1, 2, 4)):
    assert row['n'] == '4'
    for metric in stats.METRICS:
      x = raw[kv][metric]
      col = lambda f: row[stats.column(metric, f)]
      low, high = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
      assert float(col('mean')) == pytest.approx(np.mean(x), rel=1e-6)
      assert float(col('ci95_low')) == pytest.approx(low, rel=1e-6)
      assert float(col('ci95_high')) == pytest.approx(high, rel=1e-6)
      if kv == 4:  # the baseline: difference 0, no test
        assert float(col('diff_vs_baseline')) == 0
        assert col('p_value') == col('diff_ci95_low') == col('seeds_needed') == ''
        continue
      scipy_test = sps.ttest_ind(x, base[metric], equal_var=False)
      diff, dlow, dhigh, p = welch_by_hand(x, base[metric])
      assert float(col('p_value')) == pytest.approx(scipy_test.pvalue, rel=1e-5)
      assert float(col('p_value')) == pytest.approx(p, rel=1e-5)
      assert float(col('diff_vs_baseline')) == pytest.approx(diff, rel=1e-6)
      assert float(col('diff_ci95_low')) == pytest.approx(dlow, rel=1e-5)
      assert float(col('diff_ci95_high')) == pytest.approx(dhigh, rel=1e-5)
      assert int(col('seeds_needed')) >= 2
  assert float(table[1]['p_value']) < 0.01 and float(table[0]['p_value']) > 0.05
  md = open(os.path.join(workdir, 'results.md')).read()
  assert "Against the baseline `num_kv_heads=4`" in md
  assert '- num_kv_heads=2: eval loss lower than num_kv_heads=4 by' in md
  lines = {line.split(':')[0]: line for line in md.splitlines() if line.startswith('- num_kv')}
  assert 'significant at α = 0.05.' in lines['- num_kv_heads=2']
  assert 'not significant' in md.split('Eval loss:')[1].split('- num_kv_heads=1')[1].split('\n')[0]


@pytest.mark.parametrize('diff, sd1, sd2', [(0.1, 0.08, 0.12), (0.05, 0.03, 0.03)])
def test_seeds_needed_against_simulated_welch_tests(diff, sd1, sd2):
  """With n = seeds_needed seeds per group, simulated Welch tests reject at α=0.05 in >= 80% of
  draws; with n - 1 they do not."""
  n = stats.seeds_needed(diff, sd1, sd2)
  rng = np.random.default_rng(1)
  def simulated_power(k, draws=20000):
    x = rng.normal(diff, sd1, size=(draws, k))
    b = rng.normal(0.0, sd2, size=(draws, k))
    return np.mean(sps.ttest_ind(x, b, axis=1, equal_var=False).pvalue < 0.05)
  assert simulated_power(n) >= 0.79
  assert simulated_power(n - 1) < 0.81
  # The normal approximation (z_a/2 + z_b)^2 (sd1^2 + sd2^2) / diff^2 is a slight underestimate.
  approx = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) ** 2 * (sd1 ** 2 + sd2 ** 2) / diff ** 2
  assert approx <= n <= approx + 3
  assert stats.seeds_needed(0.0, 0.1, 0.1) is None


def test_loss_curves_draw_mean_and_std_band(seeded, monkeypatch):
  from matplotlib.axes import Axes
  workdir, raw, _ = seeded
  bands = []
  monkeypatch.setattr(Axes, 'fill_between',
                      lambda self, x, low, high, **kw: bands.append((list(x), low, high)))
  _, rows = report.collect(workdir)
  report.plot(os.path.join(workdir, 'bands.png'), rows)
  assert len(bands) == 3
  steps, low, high = bands[2]  # the kv=4 group's band at steps 100 and 200
  final = np.array(raw[4]['eval_loss'])
  assert steps == [100, 200]
  assert high[1] - low[1] == pytest.approx(2 * final.std(ddof=1))
  assert (high[1] + low[1]) / 2 == pytest.approx(final.mean())


def test_compare_workdirs_builds_the_same_table(seeded, tmp_path):
  """Plain train.py workdirs and a sweep workdir: grouped by the config fields that differ."""
  from configs import default, schema
  workdir, raw, table = seeded
  runs = []
  for i, (lr, loss) in enumerate([(1e-3, 3.1), (1e-3, 3.2), (2e-3, 2.9), (2e-3, 2.95)]):
    d = tmp_path / f'run{i}'
    d.mkdir()
    config = schema.apply_overrides(default.get_config('tiny'),
                                    {**TINY, 'train.learning_rate': lr, 'train.seed': i})
    (d / 'config.json').write_text(schema.to_json(config))
    write_run(str(d), [(100, loss + 1), (200, loss)], loss, [500.0, 500.0])
    os.makedirs(d / 'checkpoints' / '200')
    runs.append(str(d))
  out = str(tmp_path / 'cmp')
  compare.run(runs, out)
  with open(os.path.join(out, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['group'] for r in rows] == ['learning_rate=0.001', 'learning_rate=0.002']
  test = sps.ttest_ind([2.9, 2.95], [3.1, 3.2], equal_var=False)
  assert float(rows[1]['p_value']) == pytest.approx(test.pvalue, rel=1e-5)
  assert float(rows[1]['diff_vs_baseline']) == pytest.approx(-0.225)
  assert os.path.isfile(os.path.join(out, 'loss_curves.png'))
  assert 'Comparison of:' in open(os.path.join(out, 'results.md')).read()
  # A sweep workdir gives its trials; the groups are its kv_heads settings again.
  compare.run([workdir], out)
  with open(os.path.join(out, 'summary.csv')) as f:
    again = list(csv.DictReader(f))
  assert [r['eval_loss_mean'] for r in again] == [r['eval_loss_mean'] for r in table]
  with pytest.raises(spec.SweepError, match='neither sweep.json'):
    compare.collect([str(tmp_path)])


def test_scaling_fit_recovers_a_known_exponent():
  e, a, alpha = 1.6, 30.0, 0.32
  xs = np.geomspace(1e4, 1e6, 6)
  rng = np.random.default_rng(0)
  values = [scaling.law(x, e, a, alpha) + rng.normal(0, 0.004, size=3) for x in xs]
  f = scaling.fit('params', xs, values)
  assert f.bootstrap == 'seeds' and f.successful > 900
  low, high = f.intervals['alpha']
  assert low <= alpha <= high and high - low < 0.2
  assert f.intervals['e'][0] < f.e < f.intervals['e'][1] and f.e == pytest.approx(e, abs=0.03)
  assert f.alpha == pytest.approx(alpha, abs=0.05)
  # One value per size: the residual bootstrap; noise-free points are fitted exactly.
  exact = scaling.fit('params', xs, [[scaling.law(x, e, a, alpha)] for x in xs])
  assert exact.bootstrap == 'residuals'
  assert (exact.e, exact.a, exact.alpha) == pytest.approx((e, a, alpha), rel=1e-3)


def test_scaling_sweep_writes_csv_png_and_prints_the_fit(tmp_path, capsys):
  trials = [{'model.d_model': d, 'model.num_heads': 4, 'model.mlp_dim': 2 * d}
            for d in (32, 64, 128)]
  path = write_sweep(tmp_path, 's', trials, scaling={'x': 'params'})
  sweep = spec.load(path)
  workdir = str(tmp_path / 'out')
  runner.prepare(workdir, sweep)
  counts = [report.param_count(t.config) for t in sweep.trials]
  for t, n in zip(sweep.trials, counts):
    write_run(runner.trial_dir(workdir, t), [(200, scaling.law(n, 2.0, 50.0, 0.3))], 2.0, [1.0])
  report.write_report(workdir)
  with open(os.path.join(workdir, 'scaling.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [float(r['params']) for r in rows] == counts
  fitted = json.load(open(os.path.join(workdir, 'scaling.json')))
  assert fitted['alpha'] == pytest.approx(0.3, rel=1e-3)
  assert 'Scaling fit: L(params) = 2.0000' in capsys.readouterr().out
  assert os.path.isfile(os.path.join(workdir, 'scaling.png'))
  # x='tokens': the tokens per run, steps x batch x sequence length.
  by_steps = [{'train.steps': s} for s in (100, 200, 400)]
  tokens = spec.load(write_sweep(tmp_path, 't', by_steps, scaling={'x': 'tokens'}))
  t = tokens.trials[0].config
  assert scaling.x_value('tokens', t) == 100 * t.train.batch_size * t.data.seq_len


@pytest.mark.parametrize('extra, message', [
    ({'baseline': {'model.num_kv_heads': 3}}, "'baseline' {'model.num_kv_heads': 3} matches no "
                                              'group of trials; the groups are: num_kv_heads=1'),
    ({'scaling': {'x': 'params'}}, "'scaling' with x='params' needs groups of at least 3 "
                                   'different sizes; these trials give 2'),
    ({'scaling': {'x': 'width'}}, "'scaling' must be {'x': one of params, flops, tokens}"),
    ({'pruner': 'median'}, "'pruner' needs a search sweep"),
])
def test_bad_statistics_fields_fail_before_any_trial(tmp_path, extra, message):
  trials = [{'model.num_kv_heads': 1}, {'model.num_kv_heads': 2}]
  path = write_sweep(tmp_path, 's', trials, seeds=[0, 1], **extra)
  with pytest.raises(spec.SweepError) as e:
    spec.load(path)
  assert message in str(e.value)


@pytest.mark.slow
def test_bad_baseline_on_the_command_line_writes_nothing(tmp_path):
  path = write_sweep(tmp_path, 's', GROUPS, baseline={'model.num_kv_heads': 8})
  workdir = tmp_path / 'out'
  result = sweep_cli(f'--sweep={path}', f'--workdir={workdir}')
  assert result.returncode != 0 and "'baseline'" in result.stderr and 'matches no group' in result.stderr
  assert not workdir.exists()


def test_shipped_scaling_and_pruned_search_sweeps_validate():
  from sweeps import search
  from tests.conftest import ROOT
  full = spec.load(os.path.join(ROOT, 'configs', 'sweeps', 'scaling.py'))
  assert len(full.trials) == 10 and full.scaling == {'x': 'params'}
  counts = sorted({report.param_count(t.config) for t in full.trials})
  assert len(counts) == 5 and counts[-1] / counts[0] > 10  # about a decade of parameters
  assert len(spec.load(os.path.join(ROOT, 'configs', 'sweeps', 'scaling.py:quick')).trials) == 6
  path = os.path.join(ROOT, 'configs', 'sweeps', 'lr_search.py')
  for arg, sampler, pruner in [('', 'tpe', None), (':asha', 'tpe', 'asha'),
                               (':random,median', 'random', 'median')]:
    s = search.build(spec.load_raw(path + arg), path + arg)
    assert (s.sampler, s.pruner, s.num_trials) == (sampler, pruner, 10)
