"""Time to 95% held-out exact match for an encoder-decoder synthetic task, through train.py.

  python benchmarks/encdec_exact_match.py [--config=configs/encdec.py:reversal] [--workdir=DIR]

Runs the README command in a fresh workdir, watches metrics.jsonl, and prints the wall-clock
seconds (compilation included) and step at which the eval exact match first reached the target,
the final exact match, the process CPU time and the machine's load average (other processes
share the cores; CPU time is the load-independent figure).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/encdec.py:reversal')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--target', type=float, default=0.95)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix='encdec-bench-')
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    raise SystemExit(f'error: --workdir={workdir} already holds a run; give a new one.')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  load_before = os.getloadavg()[0]
  start = time.time()
  proc = subprocess.Popen([sys.executable, 'train.py', f'--config={args.config}',
                           f'--workdir={workdir}'], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  reached, seen = None, 0
  while True:
    done = proc.poll() is not None
    if os.path.exists(metrics):
      with open(metrics) as f:
        lines = [json.loads(line) for line in f if line.strip()]
      for m in lines[seen:]:
        if reached is None and m.get('eval_exact_match', 0.0) >= args.target:
          reached = (time.time() - start, m['step'], m['eval_exact_match'])
      seen = len(lines)
    if done:
      break
    time.sleep(0.5)
  wall = time.time() - start
  if proc.returncode:
    raise SystemExit(f'train.py failed:\n{proc.stderr.read()[-3000:]}')
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  evals = [m for m in lines if 'eval_exact_match' in m]
  print(f'config {args.config}  workdir {workdir}')
  print('eval exact match by step: ' + ', '.join(
      f'{m["step"]}: {100 * m["eval_exact_match"]:.1f}%' for m in evals))
  if reached:
    print(f'reached {100 * args.target:.0f}% held-out exact match at step {reached[1]} '
          f'({100 * reached[2]:.1f}%) after {reached[0]:.0f} s wall clock')
  else:
    print(f'never reached {100 * args.target:.0f}% held-out exact match')
  print(f'final exact match {100 * evals[-1]["eval_exact_match"]:.1f}% at step '
        f'{evals[-1]["step"]}; total {wall:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} s '
        f'CPU; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after '
        f'({os.cpu_count()} cores)')


if __name__ == '__main__':
  main()
