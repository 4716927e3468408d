"""kill -9 inside checkpoint saves at >= 50 distinct points (tests/kill_saves_script.py; two
points at a time, one a core: pytest itself keeps only one busy).

Reference: the state each step saves is a known function of the step, so every restore and the
final state are compared bitwise with what an uninterrupted run saved.
"""
import collections
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), 'kill_saves_script.py')


@pytest.mark.slow
def test_kill_9_inside_saves_never_loses_the_last_good_step(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), '64', '0'], env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  results = out['results']
  points = {(r['how'], r['where']) for r in results if r['killed']}
  assert len(points) >= 50, len(points)
  phases = collections.Counter(r['killed']['phase'] for r in results if r['killed'])
  assert {'orbax write/commit', 'checksums', 'pruning', 'data position', 'timed'} <= set(phases)
  for r in results:
    where = f"{r['how']} {r['where']} ({r['killed']}): {r['rerun']}"
    assert r['rerun_status'] == 0, where
    rerun = r['rerun']
    if not r['killed']:   # a timer later than the whole run: nothing to check but the end
      assert rerun['final_equal'], where
      continue
    assert r['signaled'], where
    if r['sealed'] == 0 and rerun['restored'] is None:
      assert 'there is none' in rerun['error'], where   # killed before the first commit
    else:   # the old (last sealed) or the new (being saved) step, never none
      assert r['sealed'] <= rerun['restored'] <= r['begun'], where
      assert rerun['bitwise'] and rerun['data_ok'], where
    assert rerun['tmp_files'] == [], where   # nothing orphaned after the next good save
    assert all(d.isdigit() for d in rerun['left']), where
    assert rerun['final_equal'], where
