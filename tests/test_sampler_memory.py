"""Sampling memory: what XLA:CPU keeps as temporaries for a bf16 model's prefill and decode
(sample.py's flags, the decode loop's converts, the lm_head in vocab slices), read from the
compiled programs' memory analysis against the model's f32 weight sizes."""
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
from workdir import hostenv


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
dec = S.decode_chunk.lower(graphdef, params, state, chunk=8).compile()
sizes = [math.prod(x.shape) * 4 for x in jax.tree.leaves(params)]
print(json.dumps({'prefill': pre.memory_analysis().temp_size_in_bytes,
                  'decode': dec.memory_analysis().temp_size_in_bytes,
                  'f32_params': sum(sizes), 'f32_largest': max(sizes)}))
'''


def test_bf16_sampling_never_holds_an_f32_copy_of_all_weights():
  """XLA:CPU computes bf16 dots from f32 copies of the weights. With sample.py's XLA flags
  (workdir/hostenv.py) prefill converts each weight just before its dot, and decode_chunk keeps
  the converts inside its loop: their temporaries stay near the largest weight's f32 size. With
  jax's default scheduler (or the converts hoisted out of the loop) they hold all of the f32
  copies at once, the f32 size of the whole model (8 MB here)."""
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
