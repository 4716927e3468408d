"""The train step, optimizer, checkpoints and resume against hand-written references."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from training import checkpoint as ckpt_lib
from training import data as data_lib
from training import loop, metrics, optim
from training.state import TrainState


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, size=(cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'weights': np.ones((cfg.train.batch_size, cfg.data.seq_len), np.float32)}


def _params_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def test_train_step_equals_hand_written_update(tiny_config):
  cfg = tiny_config({'train.warmup_steps': 2, 'train.steps': 10})
  s = loop.setup(cfg)
  state = s.init_state()
  params = jax.tree.map(jnp.array, state.params)   # the step donates `state`
  t = cfg.train
  # Independent reference: plain optax with the same hyper-parameters.
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, t.steps,
                                                t.learning_rate * t.min_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(
      schedule, b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))  # tiny config: no biases
  opt_state = tx.init(params)

  @jax.jit   # one program: optax op by op compiled dozens of tiny ones
  def reference_step(p, opt_state, batch):
    def loss_fn(p):
      logits = nnx.merge(s.graphdef, p)(batch['inputs'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return loss, optax.apply_updates(p, updates), opt_state

  for i in range(3):
    batch = _batch(cfg, i)
    loss, params, opt_state = reference_step(params, opt_state, batch)
    state, m = s.train_step(state, batch)
    assert float(m['loss']) == pytest.approx(float(loss), rel=1e-5)
  assert int(state.step) == 3
  _params_close(state.params, params, atol=1e-6)


def test_gradient_accumulation_equals_full_batch(tiny_config):
  full = loop.setup(tiny_config())
  accum = loop.setup(tiny_config({'train.grad_accum_steps': 2}))
  batch = _batch(full.config)
  batch['weights'][0, :10] = 0.0   # uneven weights: the mean is over all tokens, not micro-means
  (a, ma), (b, mb) = full.train_step(full.init_state(), batch), accum.train_step(
      accum.init_state(), batch)
  assert float(ma['loss']) == pytest.approx(float(mb['loss']), rel=1e-6)
  _params_close(a.params, b.params, atol=1e-6)


def test_weight_decay_skips_norms_and_biases(tiny_config):
  s = loop.setup(tiny_config({'model.attention_bias': True}))
  mask = optim.decay_mask(s.abstract_state.params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat and all(not v for k, v in flat.items() if 'norm' in k or 'bias' in k)
  assert all(v for k, v in flat.items() if 'kernel' in k or 'embedding' in k)


def test_schedule_warmup_then_cosine(tiny_config):
  t = tiny_config({'train.steps': 110, 'train.warmup_steps': 10}).train
  sched = optim.learning_rate_schedule(t)
  assert float(sched(5)) == pytest.approx(t.learning_rate * 0.5)
  assert float(sched(10)) == pytest.approx(t.learning_rate)
  end = t.learning_rate * t.min_lr_ratio
  mid = end + (t.learning_rate - end) * 0.5 * (1 + np.cos(np.pi * 0.5))
  assert float(sched(60)) == pytest.approx(mid, rel=1e-5)
  assert float(sched(110)) == pytest.approx(end, rel=1e-5)


def test_checkpoint_round_trip_is_exact(tiny_config, tmp_path):
  cfg = tiny_config()
  s = loop.setup(cfg)
  state, _ = s.train_step(s.init_state(), _batch(cfg))
  corpus_tokens = np.arange(5000, dtype=np.int32) % 256
  it = iter(data_lib.train_dataset(corpus_tokens, cfg.data.seq_len, 4, seed=0))
  next(it)
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(1, state, it)
  saver.close()
  expected_batch = next(it)
  it2 = iter(data_lib.train_dataset(corpus_tokens, cfg.data.seq_len, 4, seed=0))
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore(s.abstract_state, it2)
  assert isinstance(restored, TrainState) and not restored.is_params_only
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(next(it2)['inputs'], expected_batch['inputs'])
  # On disk the typed state is the two dict items earlier versions wrote.
  meta = ocp.StandardCheckpointHandler().metadata(tmp_path / 'checkpoints' / '1' / 'train').tree
  assert set(meta) == {'step', 'opt_state', 'rng'}


def test_checkpoint_of_dict_layout_restores_typed(tiny_config, tmp_path):
  """A step written as plain dict items with orbax alone (what workdirs of the untyped state
  hold) restores into a TrainState, leaf for leaf."""
  cfg = tiny_config()
  s = loop.setup(cfg)
  state, _ = s.train_step(s.init_state(), _batch(cfg))
  train = {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}
  with ocp.CheckpointManager(str(tmp_path / 'checkpoints')) as manager:
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                            train=ocp.args.StandardSave(train)))
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore(s.abstract_state)
  assert isinstance(restored, TrainState) and int(restored.step) == 1
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_logs_the_same_losses(tiny_config, tmp_path):
  """2N steps stopped right after the checkpoint at step N, then rerun == uninterrupted run."""
  cfg = tiny_config({'train.log_every': 1, 'train.checkpoint_every': 10, 'train.steps': 20})
  loop.train(cfg, str(tmp_path / 'a'))
  loop.train(cfg, str(tmp_path / 'b'), stop_after=10)
  assert ckpt_lib.Checkpointer(str(tmp_path / 'b')).latest_step() == 10
  loop.train(cfg, str(tmp_path / 'b'))
  losses = lambda d: [(m['step'], m['loss']) for m in metrics.read_metrics(str(tmp_path / d))
                      if 'loss' in m]
  assert [s for s, _ in losses('b')] == list(range(1, 21))
  assert losses('a') == losses('b')


def test_loss_falls_and_final_report(tiny_config, tmp_path, capsys):
  cfg = tiny_config({'train.steps': 30, 'train.eval_every': 15})
  result = loop.train(cfg, str(tmp_path))
  evals = [m['eval_loss'] for m in metrics.read_metrics(str(tmp_path)) if 'eval_loss' in m]
  assert evals[-1] < evals[0] < np.log(384)
  assert 'Held-out loss' in capsys.readouterr().out
  assert result['unigram_entropy'] == pytest.approx(3.26, abs=0.1)   # bytes of Python source
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['model']['d_model'] == 64
  assert os.listdir(tmp_path / 'tb')


def test_different_model_on_existing_workdir_is_refused(tiny_config, tmp_path):
  cfg = tiny_config({'train.steps': 10, 'train.warmup_steps': 2})
  loop.train(cfg, str(tmp_path))
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, ps in os.walk(tmp_path) for p in ps}
  other = tiny_config({'model.d_model': 128, 'model.num_layers': 3})
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    loop.train(other, str(tmp_path))
  assert 'model.d_model: 64 -> 128' in str(e.value)
  assert 'model.num_layers: 2 -> 3' in str(e.value)
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, ps in os.walk(tmp_path) for p in ps}
  assert before == after
