"""Preflight dry run: its figures against the initialised model, a closed-form FLOP count and
the compiled step's own memory analysis; a step that cannot fit fails naming the figure."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import schema
from models import build_model
from training import loop, mesh as mesh_lib, preflight
from tests.conftest import ROOT

# Wide enough that matmuls dominate XLA's count (elementwise work is a few % of it).
WIDER = {'model.d_model': 128, 'model.mlp_dim': 512, 'data.seq_len': 128}


@pytest.fixture(scope='module')
def wider_report():
  from configs import default
  config = schema.apply_overrides(default.get_config('tiny'), WIDER)
  return config, preflight.run(config, devices=jax.devices()[:1], device_memory_gb=1.0)


def test_param_count_equals_initialised_model(wider_report):
  config, report = wider_report
  # rbg keys: the initialisation compiles in half the CPU time of threefry's.
  params = nnx.state(build_model(config, nnx.Rngs(jax.random.key(0, impl='rbg'))), nnx.Param)
  count = sum(x.size for x in jax.tree.leaves(params))
  assert report.num_params == count == sum(report.components.values())
  assert set(report.components) == {'embed', 'final_norm', 'layers.attn', 'layers.attn_norm',
                                    'layers.mlp', 'layers.mlp_norm'}
  m = config.model
  assert report.components['layers.mlp'] == m.num_layers * 3 * m.d_model * m.mlp_dim


def closed_form_flops_per_token(config) -> float:
  """6N + 12 L H Q T (PaLM appendix B), N the matmul weights written out by hand."""
  m, t = config.model, config.data.seq_len
  q = m.d_model // m.num_heads
  attn = m.d_model * (m.num_heads * q) * 2 + m.d_model * (m.num_kv_heads * q) * 2
  mlp = 3 * m.d_model * m.mlp_dim  # SwiGLU: gate, up, down
  n = m.num_layers * (attn + mlp) + m.vocab_size * m.d_model  # tied output layer
  return 6 * n + 12 * m.num_layers * m.num_heads * q * t


def test_flops_per_token_match_6n_plus_attention(wider_report):
  config, report = wider_report
  expected = closed_form_flops_per_token(config)
  assert report.flops_per_token == pytest.approx(expected, rel=0.01)  # norms are the rest
  assert report.compiled_flops_per_token == pytest.approx(expected, rel=0.05)
  assert report.flops_per_step == report.flops_per_token * 4 * 128


def test_memory_equals_compiled_memory_analysis(wider_report):
  config, report = wider_report
  s = loop.setup(config, jax.devices()[:1])
  b, t = config.train.batch_size, config.data.seq_len
  sh = mesh_lib.batch_sharding(s.mesh)
  batch = {'inputs': jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh),
           'targets': jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh),
           'weights': jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=sh)}
  m = s.train_step.lower(s.abstract_state, batch).compile().memory_analysis()
  r = report.memory
  assert (r['arguments'], r['outputs'], r['aliased'], r['temporaries']) == (
      m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
      m.temp_size_in_bytes)
  assert r['total'] == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                        + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  # The train state is donated: its parameters and Adam moments are the aliased bytes.
  state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
  assert r['aliased'] == pytest.approx(state_bytes, rel=0.01)
  assert report.device_memory == 1024 ** 3
  preflight.check_fits(report)  # a few MiB fit in 1 GiB


def test_component_names_group_layers():
  assert preflight.component_of(('layers', 3, 'attn', 'q', 'kernel')) == 'layers.attn'
  assert preflight.component_of(('embed', 'embedding')) == 'embed'
  assert preflight.component_of(('layers', 'mlp', 'up', 'kernel')) == 'layers.mlp'  # scanned
  assert preflight.component_of(('encoder', 'layers', 0, 'mlp', 'up', 'kernel')) == \
      'encoder.layers.mlp'


def test_cli_dry_run_on_a_sharded_mesh_and_too_small_memory(tmp_path):
  """8 devices as data=2 x fsdp=2 x tensor=2: the report shows the sharding; 1 MiB of device
  memory is too little and the run fails naming the figure; nothing is written."""
  workdir = tmp_path / 'run'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  cmd = [sys.executable, 'train.py', '--config=configs/default.py:tiny', f'--workdir={workdir}',
         '--dry_run', '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2']
  proc = subprocess.run(cmd + ['--device_memory_gb=0.001'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: the train step needs ') and 'per device' in last
  assert 'but a device has 1.02 MiB (--device_memory_gb)' in last
  assert 'Mesh: data=2 x fsdp=2 x tensor=2 (8 cpu devices)' in proc.stdout
  assert 'Parameters: 98,624' in proc.stdout
  row = next(line.split() for line in proc.stdout.splitlines() if 'attn.q.kernel' in line)
  assert row[1:] == ['(x2)', '64x4x16', "('fsdp',", "'tensor',", 'None)', '32x2x16']
  assert not workdir.exists()


@pytest.mark.parametrize('flag, suggestion', [
    ('--config.model.num_kv_head=1', 'model.num_kv_heads'),
    ('--config.train.num_kv_heads=1', 'model.num_kv_heads'),
    ('--config.train.learning_rat=0.1', 'train.learning_rate'),
    ('--config.model.positionl=rope', 'model.positional'),
])
def test_misspelt_override_flag_gets_a_suggestion(flag, suggestion):
  key = flag[len('--config.'):].split('=')[0]
  with pytest.raises(schema.ConfigError) as e:
    schema.check_override_flags(['--config=configs/default.py:tiny', '--dry_run', flag])
  assert str(e.value) == f'--config.{key}: unknown key `{key}` (did you mean `{suggestion}`?).'
  schema.check_override_flags(['--config.model.num_kv_heads=1', '--config.train.steps', '5'])


def test_cli_misspelt_override_is_one_line(tmp_path):
  """Without the check, ml_collections' flag parser ends in a traceback."""
  proc = subprocess.run([sys.executable, 'train.py', '--config=configs/default.py:tiny',
                         f'--workdir={tmp_path / "run"}', '--config.model.num_kv_head=1'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --config.model.num_kv_head: unknown key `model.num_kv_head` (did you mean '
      '`model.num_kv_heads`?).')
  assert not (tmp_path / 'run').exists()
