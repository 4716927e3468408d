"""Run an ablation sweep: python sweep.py --sweep=configs/sweeps/X.py[:arg] --workdir=DIR.

Each trial trains in DIR/<trial>/ through train.py; a rerun skips finished trials and resumes
interrupted ones. Writes DIR/results.csv, results.md and loss_curves.png (seeded sweeps also
summary.csv, scaling sweeps scaling.csv/.png). A sweep file with 'search' instead of 'trials'
runs an Optuna search (sweeps/search.py). `--samples --prompt=TEXT` samples every finished trial
with the same seed into the report. `python sweep.py --compare DIR [DIR...] --workdir=OUT` builds
the same report over finished workdirs (sweeps or train.py runs).
"""
from absl import app, flags, logging

from configs import schema
from sweeps import compare, report, runner, samples, search, spec

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file[:arg] defining get_sweep().')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory holding one folder per trial.')
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'ray'], 'Where trials run.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Local backend: trials run at once.')
_RAY_ADDRESS = flags.DEFINE_string('ray_address', None,
                                   'Ray backend: join this cluster (else start a local one).')
_RAY_CPUS = flags.DEFINE_integer('ray_num_cpus', None, 'Local Ray instance: CPUs (default all).')
_CPUS = flags.DEFINE_float('cpus_per_trial', 1, 'Ray backend: CPUs each trial requests.')
_GPUS = flags.DEFINE_float('gpus_per_trial', 0, 'Ray backend: GPUs each trial requests.')
_COMPARE = flags.DEFINE_bool('compare', False, 'Report over the workdirs given as arguments '
                              '(sweeps or train.py runs) into --workdir: --compare DIR [DIR...].')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False,
                                 'Only regenerate the report from DIR (no --sweep needed).')
_SAMPLES = flags.DEFINE_bool('samples', False, "Sample every finished trial's final checkpoint "
                              'with the same --prompt and --seed into the report.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'With --samples: a prompt (repeatable).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'With --samples: tokens per completion.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'With --samples: 0 is greedy.')
_SEED = flags.DEFINE_integer('seed', 0, 'With --samples: the sampling seed, the same for all.')
flags.mark_flags_as_required(['workdir'])


def check_sample_flags() -> None:
  if not _SAMPLES.value:
    return
  if not _PROMPT.value or not all(_PROMPT.value):
    raise app.UsageError('--samples needs --prompt=TEXT (non-empty; repeat for more prompts).')
  if _MAX_NEW.value < 1:
    raise app.UsageError(f'--max_new_tokens={_MAX_NEW.value}: must be >= 1.')
  if _TEMPERATURE.value < 0:
    raise app.UsageError(f'--temperature={_TEMPERATURE.value}: must be >= 0.')


def run_compare(directories: list[str]) -> None:
  if not directories:
    raise app.UsageError('--compare needs workdirs: sweep.py --compare DIR [DIR...] --workdir=OUT.')
  if _SWEEP.value or _REPORT_ONLY.value or _SAMPLES.value:
    raise app.UsageError('--compare takes workdirs only (not --sweep, --report_only, --samples).')
  try:
    result = compare.run(directories, _WORKDIR.value)
  except (spec.SweepError, schema.ConfigError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print(result['markdown'])
  print(f'Report: {_WORKDIR.value}/results.md, results.csv, summary.csv, loss_curves.png')


def main(argv):
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if _COMPARE.value:
    return run_compare(argv[1:])
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  check_sample_flags()
  try:
    if not _REPORT_ONLY.value:
      if not _SWEEP.value:
        raise app.UsageError('--sweep is required (unless --report_only).')
      if _PARALLEL.value < 1:
        raise app.UsageError(f'--parallel={_PARALLEL.value}: must be >= 1.')
      raw = spec.load_raw(_SWEEP.value)
      if isinstance(raw, dict) and 'search' in raw:  # Optuna search: trials asked as it goes
        if _BACKEND.value != 'local':
          raise app.UsageError('search sweeps run on the local backend (--backend=local).')
        search.run(_WORKDIR.value, search.build(raw, _SWEEP.value), _PARALLEL.value)
      else:
        sweep = spec.build(raw, source=_SWEEP.value)  # every trial validated before any runs
        runner.prepare(_WORKDIR.value, sweep)
        if _BACKEND.value == 'ray':
          runner.run_ray(_WORKDIR.value, sweep, _RAY_ADDRESS.value, _RAY_CPUS.value,
                         _CPUS.value, _GPUS.value)
        else:
          runner.run_local(_WORKDIR.value, sweep, _PARALLEL.value)
    if _SAMPLES.value:
      samples.sample_trials(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                            temperature=_TEMPERATURE.value, seed=_SEED.value)
    rows = report.write_report(_WORKDIR.value)
  except (spec.SweepError, schema.ConfigError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'Report: {_WORKDIR.value}/results.md, results.csv, loss_curves.png')
  top = search.best(_WORKDIR.value)
  if top:
    print(f'Best trial: {top["trial"]} ({spec.describe(top["overrides"])}), eval loss '
          f'{top["eval_loss"]:.4f}\n  {top["command"]}')
  failed = [r['trial'] for r in rows if r['status'] not in ('done', 'pruned')]
  if failed:
    raise SystemExit(f'{len(failed)} of {len(rows)} trials not done: {", ".join(failed)}')


if __name__ == '__main__':
  app.run(main)
