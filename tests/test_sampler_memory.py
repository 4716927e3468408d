"""Sampling memory: what XLA:CPU keeps as temporaries for a bf16 model's prefill and decode
(sample.py's flags, the decode loop's converts, the lm_head in vocab slices), read from the
compiled programs' memory analysis against the model's f32 weight sizes; sample.py's programs
compiled in a child process; parameters restored in groups."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import default, schema
from models import build_model
from sampling import sampler as sampler_lib
from sampling.sampler import Sampler
from tests.conftest import run_cli
from workdir import checkpoints, hostenv
from workdir.load import load_workdir


def _compiled_temporaries(script: str) -> dict:
  """Runs `script` in a fresh process with sample.py's XLA:CPU flags (no compilation cache, so
  every program really compiles) and returns the JSON it prints last."""
  env = dict(os.environ, XLA_FLAGS=' '.join(hostenv.SAMPLING_XLA_CPU_FLAGS),
             JAX_ENABLE_COMPILATION_CACHE='false', JAX_PLATFORMS='cpu')
  r = run_cli('-c', script, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


_BF16_TEMPS = '''
import json, math
import jax, jax.numpy as jnp
from flax import nnx
from configs import default, schema
from models import build_model
from sampling import sampler as S
cfg = schema.apply_overrides(default.get_config('tiny'), {
    'model.param_dtype': 'bfloat16', 'model.dtype': 'bfloat16', 'model.num_layers': 8,
    'model.d_model': 128, 'model.mlp_dim': 512})
graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
controls = S.SamplingControls(jnp.float32(0), jnp.int32(0), jnp.float32(1))
args = (graphdef, params, jnp.zeros((1, 16), jnp.int32), jnp.array([5]), jnp.array([8]),
        jnp.array([-1]), controls, jnp.int32(0))
pre = S.prefill.lower(*args, cache_len=128).compile()
state, _ = S.prefill(*args, cache_len=128)
dec = S.decode_program().lower(graphdef, params, state, chunk=8).compile()
sizes = [math.prod(x.shape) * 4 for x in jax.tree.leaves(params)]
print(json.dumps({'prefill': pre.memory_analysis().temp_size_in_bytes,
                  'decode': dec.memory_analysis().temp_size_in_bytes,
                  'f32_params': sum(sizes), 'f32_largest': max(sizes)}))
'''


def test_bf16_sampling_never_holds_an_f32_copy_of_all_weights():
  """XLA:CPU computes bf16 dots from f32 copies of the weights. With sample.py's XLA flags
  (workdir/hostenv.py) prefill converts each weight just before its dot, and the decode program
  keeps the converts inside its loop: their temporaries stay near the largest weight's f32 size.
  With jax's default scheduler (or the converts hoisted out of the loop) they hold all of the
  f32 copies at once, the f32 size of the whole model (8 MB here)."""
  t = _compiled_temporaries(_BF16_TEMPS)
  assert t['f32_params'] > 20 * t['f32_largest']   # the bound below tells the two apart
  assert t['prefill'] < 2 * t['f32_largest'], t
  assert t['decode'] < 2 * t['f32_largest'], t


_SLICED_TEMPS = '''
import json
import jax, jax.numpy as jnp
from flax import nnx
from configs import default, schema
from models import build_model
from sampling import sampler as S
cfg = schema.apply_overrides(default.get_config('tiny'), {
    'model.param_dtype': 'bfloat16', 'model.dtype': 'bfloat16', 'model.num_layers': 2,
    'model.vocab_size': 32000, 'model.tie_embeddings': False})
graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
temps = {}
for n in (1, 8):
  S.LOGIT_SLICES = n
  jax.clear_caches()
  sampler = S.Sampler(graphdef, params, max_len=256, chunk=8)
  sampler.compile(1, 9, 24)
  temps[n] = [e.memory_analysis().temp_size_in_bytes for e in sampler.compiled.values()]
print(json.dumps({'temps': temps, 'f32_head': cfg.model.d_model * 32000 * 4}))
'''


def test_bf16_lm_head_in_vocab_slices_same_logits_and_tokens(monkeypatch):
  """Sampling a bf16 model computes the lm_head in LOGIT_SLICES vocab slices (XLA:CPU's f32 copy
  of the weight then exists one slice at a time): the logits, and so the greedy tokens, equal
  the single dot's; with sample.py's XLA flags prefill's and decode's temporaries shrink by
  nearly the lm_head's f32 size."""
  cfg = schema.apply_overrides(default.get_config('tiny'), {
      'model.param_dtype': 'bfloat16', 'model.dtype': 'bfloat16', 'model.num_layers': 2,
      'model.vocab_size': 8000, 'model.tie_embeddings': False})
  graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
  x = jax.random.normal(jax.random.key(1), (2, 5, cfg.model.d_model), jnp.bfloat16)
  model = nnx.merge(graphdef, params)
  whole = model.logits(x)
  model.logit_slices = 3   # 8000 does not divide by 3: the last slice is shorter
  np.testing.assert_array_equal(np.asarray(model.logits(x)), np.asarray(whole))
  prompts = [np.arange(3, 12), np.arange(40, 45)]
  runs = {}
  for n in (1, 8):
    monkeypatch.setattr(sampler_lib, 'LOGIT_SLICES', n)
    jax.clear_caches()
    runs[n] = Sampler(graphdef, params, max_len=256, chunk=8).generate(prompts,
                                                                         max_new_tokens=24)
  for a, b in zip(runs[1], runs[8]):
    np.testing.assert_array_equal(a, b)
  t = _compiled_temporaries(_SLICED_TEMPS)
  for whole, sliced in zip(t['temps']['1'], t['temps']['8']):   # prefill, decode
    # up to 7/8 of the f32 lm_head saved (prefill: its other temporaries then set the peak)
    assert whole - sliced > 0.6 * t['f32_head'], t


def test_sample_py_compiles_in_a_child_process_with_the_same_output(trained, tmp_path):
  """sample.py compiles a decoder's programs in a child process (`--save_programs`) and loads
  them: the same samples as compiling in-process; bad input met by the child is reported once,
  by the parent. The saved programs, loaded into a Sampler, make the jit path's tokens, compile
  nothing, and are released after each request."""
  _, workdir = trained
  args = ('sample.py', f'--workdir={workdir}', '--prompt=def ', '--max_new_tokens=40',
          '--num_samples=2', '--temperature=0.8', '--seed=4')
  here = run_cli(*args, '--nocompile_in_child')
  child = run_cli(*args, '--verbosity=0')
  assert here.returncode == 0 and child.returncode == 0, here.stderr[-2000:] + child.stderr[-2000:]
  assert 'programs compiled in a child process' in child.stderr
  assert 'warning' not in child.stderr
  assert child.stdout == here.stdout and here.stdout.count('--- sample') == 2

  too_long = run_cli('sample.py', f'--workdir={workdir}', '--prompt=' + 'x' * 300)
  assert too_long.returncode == 1
  assert too_long.stderr.count('error:') == 1 and '--prompt' in too_long.stderr, too_long.stderr
  assert 'warning' not in too_long.stderr

  programs = str(tmp_path / 'programs')
  saved = run_cli(*args, f'--save_programs={programs}', '--nocompile_in_child')
  assert saved.returncode == 0 and saved.stdout == '', saved.stderr[-2000:]
  loaded = load_workdir(workdir)
  prompts = [np.frombuffer(b'def ', np.uint8).astype(np.int32)] * 2
  kw = dict(max_new_tokens=40, temperature=0.8, seed=4)
  plain = Sampler(loaded.graphdef, loaded.params, max_len=256).generate(prompts, **kw)
  sampler = Sampler(loaded.graphdef, loaded.params, max_len=256)
  sampler.load_compiled(programs)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  for _ in range(2):
    out = sampler.generate(prompts, **kw)
    assert sampler.compiled == {} and compiles == []
    for a, b in zip(out, plain):
      np.testing.assert_array_equal(a, b)


def test_a_failing_compile_child_is_reported_and_sampling_goes_on():
  """`compile_in_child`: a child that fails yields a one-line warning (its last stderr line)
  and None (sample.py then compiles in-process); a child that met bad input (exit BAD_INPUT)
  yields None silently, the parent reporting the error itself."""
  script = (
      'import sys, tempfile, sample\n'
      'for child in ("sys.exit(\'boom\')", f"sys.exit({sample.BAD_INPUT})"):\n'
      '  sys.orig_argv = [sys.executable, "-c", "import sys; " + child]\n'
      '  with tempfile.TemporaryDirectory() as d:\n'
      '    print(sample.compile_in_child(d))\n')
  r = run_cli('-c', script)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ['None', 'None']
  assert r.stderr.strip().splitlines() == [
      'warning: compiling in a child process failed (boom); compiling here instead.']


def test_parameters_restored_in_groups_equal_one_restore(trained):
  """checkpoints.restore_item reads the parameters in groups of GROUP_BYTES (one orbax partial
  restore each): the same tree, bit for bit, as one group of all of them."""
  _, workdir = trained
  step = checkpoints.step_dir(workdir, checkpoints.steps(workdir)[-1])
  abstract = checkpoints.abstract_params(load_workdir(workdir).config)[1]
  one = checkpoints.restore_item(step, abstract, group_bytes=1 << 40)
  each = checkpoints.restore_item(step, abstract, group_bytes=1)   # a group per parameter
  assert jax.tree.structure(one) == jax.tree.structure(each) == jax.tree.structure(abstract)
  assert len(jax.tree.leaves(one)) > 10
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(each)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
