"""Scan over layers, remat, mixed precision; meshes and resharding.

The reference for the scanned stack is the unrolled stack (a Python loop over separate blocks);
multi-device tests run tests/scale_script.py in subprocesses with 8 simulated CPU devices
(XLA_FLAGS must be set before jax is imported, and this process has imported it already);
tests/test_multiprocess.py runs two processes over jax.distributed.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import build_model, decoder, scan

SCRIPT = os.path.join(os.path.dirname(__file__), 'scale_script.py')


def _tokens(cfg, batch=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.data.seq_len), 0, 256)


def _loss_and_grads(graphdef, params, tokens):
  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def _close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_scanned_init_is_the_stacked_unrolled_init(tiny_config):
  unrolled = nnx.state(build_model(tiny_config(), nnx.Rngs(0)), nnx.Param)
  scanned = nnx.state(build_model(tiny_config({'model.scan_layers': True}), nnx.Rngs(0)), nnx.Param)
  q = scanned['layers']['attn']['q']['kernel']
  assert q.shape == (2, 64, 4, 16)
  assert q.get_metadata()['out_sharding'] == ('layers', 'embed', 'heads', 'head_dim')
  _close(scan.to_scanned(unrolled), scanned, rtol=0, atol=0)
  back = scan.to_unrolled(scanned)
  _close(back, unrolled, rtol=0, atol=0)
  assert back['layers'][1]['attn']['q']['kernel'].get_metadata()['out_sharding'] == (
      'embed', 'heads', 'head_dim')
  assert scan.to_unrolled(unrolled) is unrolled and scan.to_scanned(scanned) is scanned


@pytest.mark.parametrize('overrides', [{}, {'model.positional': 'learned', 'model.norm': 'layernorm',
                                            'model.mlp_activation': 'gelu'}])
def test_scan_equals_unrolled_logits_and_grads(tiny_config, overrides):
  cfg_u = tiny_config({**overrides, 'model.num_layers': 3})
  cfg_s = tiny_config({**overrides, 'model.num_layers': 3, 'model.scan_layers': True})
  gu, pu = nnx.split(build_model(cfg_u, nnx.Rngs(1)), nnx.Param)
  gs = nnx.graphdef(build_model(cfg_s, nnx.Rngs(0)))
  tokens = _tokens(cfg_u)
  (lu, logits_u), grads_u = _loss_and_grads(gu, pu, tokens)
  (ls, logits_s), grads_s = _loss_and_grads(gs, scan.to_scanned(pu), tokens)
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5)
  assert float(ls) == pytest.approx(float(lu), rel=1e-6)
  _close(scan.to_unrolled(grads_s), grads_u, atol=1e-6, rtol=1e-4)


def _compiled_grads(cfg, tokens):
  graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  compiled = jax.jit(jax.grad(loss_fn)).lower(params).compile()   # once: run and measured
  return compiled(params), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('scanned', [True, False])
def test_remat_changes_memory_not_results(tiny_config, scanned):
  base = {'model.num_layers': 4, 'model.scan_layers': scanned, 'data.seq_len': 128}
  tokens = _tokens(tiny_config(base), batch=4)
  grads, memory = {}, {}
  for policy in ('none', 'full', 'save_dots'):
    grads[policy], memory[policy] = _compiled_grads(tiny_config({**base, 'model.remat': policy}),
                                                    tokens)
  for policy in ('full', 'save_dots'):
    _close(grads[policy], grads['none'], atol=1e-6, rtol=1e-5)
  assert memory['full'] < memory['none'], memory
  if scanned:  # the scan's saved activations shrink with what the policy keeps
    assert memory['full'] < memory['save_dots'] < memory['none'], memory


def test_bfloat16_compute_keeps_fp32_params_logits_and_grads(tiny_config):
  cfg32, cfg16 = tiny_config(), tiny_config({'model.dtype': 'bfloat16'})
  g32, p32 = nnx.split(build_model(cfg32, nnx.Rngs(0)), nnx.Param)
  g16, p16 = nnx.split(build_model(cfg16, nnx.Rngs(0)), nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype('float32')}
  tokens = _tokens(cfg32)
  (l32, logits32), grads32 = _loss_and_grads(g32, p32, tokens)
  (l16, logits16), grads16 = _loss_and_grads(g16, p16, tokens)
  assert logits16.dtype == jnp.float32 and l16.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {jnp.dtype('float32')}
  assert float(l16) == pytest.approx(float(l32), rel=1e-2)   # bf16 has ~3 significant digits
  np.testing.assert_allclose(logits16, logits32, atol=5e-2)
  # Not silently fp32: the bf16 rounding is visible.
  assert float(jnp.abs(logits16 - logits32).max()) > 1e-5


def test_scan_refuses_layers_that_differ(tiny_config, monkeypatch):
  monkeypatch.setattr(decoder, 'layer_window', lambda cfg, i: 8 if i % 2 else None)
  with pytest.raises(ValueError, match='model.scan_layers'):
    build_model(tiny_config({'model.scan_layers': True}), nnx.Rngs(0))


def _script(*args, devices=8, timeout=900):
  env = dict(os.environ, LMX_NO_REEXEC='1')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, SCRIPT, args[0], str(devices), *args[1:]], env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def meshes_and_reshard(tmp_path_factory):
  """One 8-device subprocess for both mesh tests (one jax start, shared compilations)."""
  return _script('meshes+reshard', str(tmp_path_factory.mktemp('reshard')))


@pytest.mark.slow
def test_meshes_give_equal_losses_and_really_shard(meshes_and_reshard):
  runs = meshes_and_reshard['meshes']
  ref = runs['1']['losses']
  for name, run in runs.items():
    np.testing.assert_allclose(run['losses'], ref, rtol=2e-6, err_msg=name)
  # Shards, not copies: fsdp=8 splits 'embed' 8 ways (parameters and Adam moments alike).
  fsdp = runs['fsdp8']
  assert fsdp['up'] == {'spec': "P('fsdp', 'tensor')", 'shape': [64, 128], 'shard': [8, 128],
                        'devices': 8}
  assert fsdp['adam_mu_up']['shard'] == [8, 128] and fsdp['embedding']['shard'] == [384, 8]
  assert runs['data8']['up']['shard'] == [64, 128]    # pure data parallel: replicated
  mixed = runs['d2f2t2']
  assert mixed['up']['shard'] == [32, 64] and mixed['q']['shard'] == [32, 2, 16]
  assert mixed['embedding']['shard'] == [192, 32]
  assert runs['d2f2t2_scan']['up']['shard'] == [2, 32, 64]  # the layer axis stays whole


def test_mesh_and_batch_errors_name_the_fields(tiny_config):
  from configs.schema import ConfigError
  from training import mesh as mesh_lib
  from workdir import mesh as wd_mesh
  cfg = tiny_config({'mesh.data': 3, 'mesh.fsdp': 2})
  with pytest.raises(ConfigError, match=r'data\*fsdp\*tensor = 6 .* 8 devices'):
    wd_mesh.mesh_shape(cfg.mesh, 8)
  with pytest.raises(ConfigError, match='8 is not divisible by 3'):
    wd_mesh.mesh_shape(tiny_config({'mesh.data': -1, 'mesh.fsdp': 3}).mesh, 8)
  assert wd_mesh.mesh_shape(tiny_config({'mesh.data': -1, 'mesh.tensor': 2}).mesh, 8) == (4, 1, 2)
  with pytest.raises(ConfigError, match=r'train.batch_size=4 .* data\*fsdp=8'):
    mesh_lib.check_batch(tiny_config(), (8, 1, 1))
  with pytest.raises(ConfigError, match=r'micro-batches of 2 rows .* data\*fsdp=4'):
    mesh_lib.check_batch(tiny_config({'train.grad_accum_steps': 2}), (2, 2, 1))
  mesh_lib.check_batch(tiny_config(), (2, 2, 2))
  bad_rules = tiny_config({'mesh.rules': (('embed', 'fsdp'), ('mlp', 'model'))})
  with pytest.raises(ConfigError, match="'mlp' maps to unknown mesh axis 'model'"):
    wd_mesh.rules_of(bad_rules.mesh)


def test_distributed_settings_from_flags_env_and_slurm(monkeypatch):
  from configs.schema import ConfigError
  from training import distributed
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_JOB_ID',
              'SLURM_NTASKS'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.settings() is None
  assert distributed.settings('h:1', 2, 1) == {'coordinator_address': 'h:1', 'num_processes': 2,
                                              'process_id': 1}
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:99')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.settings()['process_id'] == 3
  assert distributed.settings(process_id=0)['process_id'] == 0   # flags win
  with pytest.raises(ConfigError, match='need 0 <= process_id < num_processes'):
    distributed.settings(process_id=4)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var)
  with pytest.raises(ConfigError, match='--num_processes, --process_id missing'):
    distributed.settings('h:1')
  with pytest.raises(ConfigError, match='must be host:port'):
    distributed.settings('localhost', 2, 0)
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.settings() is None
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed.settings() == {}   # jax.distributed detects SLURM by itself


CLUSTERS = {
    'SLURM': {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'},
    'Open MPI': {'OMPI_MCA_orte_hnp_uri': '1234.0;tcp://10.0.0.1:5000',
                 'OMPI_COMM_WORLD_SIZE': '2'},
    'Kubernetes': {'KUBERNETES_SERVICE_HOST': '10.96.0.1', 'JOB_COMPLETION_INDEX': '1'},
    'Cloud TPU': {'TPU_WORKER_HOSTNAMES': 'w-0,w-1'},
}
CLUSTER_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                'TPU_PROCESS_ADDRESSES', *{v for env in CLUSTERS.values() for v in env})


@pytest.mark.parametrize('cluster', CLUSTERS)
def test_cluster_environments_initialize_jax_distributed_and_flags_override(cluster,
                                                                              monkeypatch):
  """Each cluster JAX detects starts jax.distributed with no arguments (JAX reads the rest);
  flags still win; one task, rank or host stays single-process."""
  from training import distributed
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)   # keep this process's backend
  assert not distributed.initialize() and distributed.cluster_environment() is None
  for var, value in CLUSTERS[cluster].items():
    monkeypatch.setenv(var, value)
  assert distributed.cluster_environment() == cluster
  assert distributed.initialize() and calls == [{}]
  assert distributed.initialize(process_id=1, coordinator_address='h:9') and calls[-1] == {
      'coordinator_address': 'h:9', 'process_id': 1}
  single = {'SLURM_NTASKS': '1', 'OMPI_COMM_WORLD_SIZE': '1', 'TPU_WORKER_HOSTNAMES': 'w-0'}
  if cluster != 'Kubernetes':
    monkeypatch.setenv(*next((k, v) for k, v in single.items() if k in CLUSTERS[cluster]))
    assert distributed.cluster_environment() is None and distributed.settings() is None


def test_validation_rejects_rules_with_unknown_mesh_axes(tiny_config):
  from configs import schema
  with pytest.raises(schema.ConfigError, match="'heads' maps to unknown mesh axis 'model'"):
    schema.validate(tiny_config({'mesh.rules': (('heads', ('tensor', 'model')),)}))


@pytest.mark.slow
def test_restore_onto_a_different_mesh_continues_identically(meshes_and_reshard):
  out = meshes_and_reshard['reshard']
  for n in (1, 2):
    run = out[f'devices{n}']
    assert run['step'] == 2 and run['up']['devices'] == n
    assert run['loss'] == pytest.approx(out['fsdp8'], rel=1e-6, abs=1e-6)
  assert out['devices2']['up']['shard'] == [32, 128]   # re-sharded over fsdp=2, not replicated


def _num_params(cfg) -> int:
  model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_gpt2_and_1b_configs_have_the_published_sizes():
  from configs import gpt2, llm1b, schema
  # GPT-2 small has 124,439,808 parameters (vocab 50257); padding the vocabulary to 50304
  # adds 47 rows of 768.
  assert _num_params(schema.validate(gpt2.get_config())) == 124_439_808 + 47 * 768
  c = schema.validate(llm1b.get_config()).model
  kv = c.num_kv_heads * c.head_dim
  per_layer = 2 * c.d_model + 2 * c.d_model ** 2 + 2 * c.d_model * kv + 3 * c.d_model * c.mlp_dim
  assert _num_params(llm1b.get_config()) == (c.vocab_size * c.d_model + c.num_layers * per_layer
                                             + c.d_model)
  assert 1.0e9 < _num_params(llm1b.get_config()) < 1.2e9


@pytest.mark.parametrize('name', ['gpt2', 'llm1b'])
def test_smoke_variants_train_a_step(name):
  import importlib

  from training import loop
  cfg = importlib.import_module(f'configs.{name}').get_config('smoke')
  s = loop.setup(cfg)
  tokens = np.asarray(_tokens(cfg, batch=cfg.train.batch_size)) % 256
  batch = {'inputs': tokens, 'targets': tokens, 'weights': np.ones(tokens.shape, np.float32)}
  state, metrics = s.train_step(s.init_state(), batch)
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1


def test_kv_cache_decoding_of_a_scanned_model_equals_its_full_forward(tiny_config):
  from tests.test_sampler import ATOL, cached_logits, split_model
  graphdef, params = split_model(tiny_config({'model.scan_layers': True}))
  lengths, n = (5, 9), 6
  seqs = np.random.RandomState(0).randint(0, 256, (2, 9 + n)).astype(np.int32)
  full = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, seqs))
  tokens, new = np.zeros((2, 9), np.int32), np.zeros((2, n), np.int32)
  for row, length in enumerate(lengths):
    tokens[row, 9 - length:] = seqs[row, :length]
    new[row] = seqs[row, length:length + n]
  first, steps = cached_logits(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths),
                               jnp.asarray(new), 32)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(first[row], full[row, length - 1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(steps[row], full[row, length:length + n], atol=ATOL, rtol=0)


def test_encoder_decoder_with_scanned_decoder_layers_computes_the_same(tiny_config):
  from configs import encdec, schema
  logits = {}
  for scanned in (False, True):
    cfg = schema.validate(schema.apply_overrides(encdec.get_config('addition,tiny'), {
        'model.scan_layers': scanned, 'model.remat': 'full' if scanned else 'none'}))
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
    src = jax.random.randint(jax.random.key(0), (2, 12), 3, 20)
    tgt = jax.random.randint(jax.random.key(1), (2, 7), 3, 20)
    logits[scanned] = jax.jit(lambda p: nnx.merge(graphdef, p)(src, tgt))(params)
  np.testing.assert_allclose(logits[True], logits[False], atol=1e-5)


def test_scanned_workdir_loads_unrolled_for_sampling_and_export(tiny_config, tmp_path):
  from interop.convert import export_hf
  from interop.hf_params import SafetensorsFolder
  from workdir.files import write_config
  from sampling.sampler import Sampler
  from workdir.load import load_workdir, open_workdir, restore
  from training import checkpoint as ckpt_lib
  from training import loop
  cfg = tiny_config({'model.scan_layers': True})
  s = loop.setup(cfg)
  state = s.init_state()
  tokens = _tokens(cfg)
  want = np.asarray(nnx.merge(s.graphdef, state.params)(tokens))
  write_config(str(tmp_path / 'wd'), cfg)
  saver = ckpt_lib.Checkpointer(str(tmp_path / 'wd'))
  saver.save(0, state)
  saver.close()
  loaded = load_workdir(str(tmp_path / 'wd'))
  assert not loaded.config.model.scan_layers and not scan.is_scanned(loaded.params)
  np.testing.assert_allclose(nnx.merge(loaded.graphdef, loaded.params)(tokens), want, atol=1e-5)
  # sample.py's order: compile against the unrolled abstract params, then restore and run
  opened = open_workdir(str(tmp_path / 'wd'))
  sampler = Sampler(opened.graphdef, opened.abstract, max_len=cfg.model.max_len, chunk=8)
  sampler.compile(1, 5, 12)
  sampler.params = restore(opened).params
  plain = Sampler(loaded.graphdef, loaded.params, max_len=cfg.model.max_len, chunk=8)
  prompt = [np.arange(5)]
  np.testing.assert_array_equal(sampler.generate(prompt, max_new_tokens=12)[0],
                                plain.generate(prompt, max_new_tokens=12)[0])
  export_hf(str(tmp_path / 'wd'), str(tmp_path / 'hf'))
  names = set(SafetensorsFolder(str(tmp_path / 'hf')).entries)
  assert {f'model.layers.{i}.mlp.up_proj.weight' for i in range(2)} <= names


def test_scan_with_mixed_window_pattern_is_a_config_error(tiny_config):
  from configs import schema
  with pytest.raises(schema.ConfigError, match='model.scan_layers=True'):
    schema.validate(tiny_config({'model.scan_layers': True, 'model.sliding_window': 8,
                                 'model.window_pattern': 'LG'}))
  schema.validate(tiny_config({'model.scan_layers': True, 'model.sliding_window': 8,
                               'model.window_pattern': 'LL'}))


def test_scanned_dropout_equals_unrolled_dropout(tiny_config):
  cfg_u = tiny_config({'model.dropout': 0.3})
  gu, pu = nnx.split(build_model(cfg_u, nnx.Rngs(0)), nnx.Param)
  gs = nnx.graphdef(build_model(tiny_config({'model.dropout': 0.3, 'model.scan_layers': True}),
                                nnx.Rngs(0)))
  tokens, rng = _tokens(cfg_u), jax.random.key(3)
  lu = jax.jit(lambda p: nnx.merge(gu, p)(tokens, rng=rng))(pu)
  ls = jax.jit(lambda p: nnx.merge(gs, p)(tokens, rng=rng))(scan.to_scanned(pu))
  np.testing.assert_allclose(ls, lu, atol=1e-5)
  assert float(jnp.abs(lu - nnx.merge(gu, pu)(tokens)).max()) > 1e-3   # dropout did something
