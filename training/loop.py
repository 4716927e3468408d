"""Init, train_step, eval_step and the loop. Steps are pure functions of (state, batch) under jit.

The train state is a `training.state.TrainState` (step, params, opt_state, rng, frozen);
`params` is the model's `nnx.State` of the Params that train, re-attached to the static graphdef
inside the step with `nnx.merge` (together with `frozen`, LoRA's base: models/lora.py); `rng` is
raw key data [2] uint32 (checkpointed), folded with the step for per-step randomness.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from configs import schema
from models import build_model, lora
from models.config import ModelConfig
from text.tokenizer import make_tokenizer
from training import checkpoint as ckpt_lib
from training import data as data_lib
from training import flops
from training import guards
from training import mixture
from training import seq2seq_data
from training.state import TrainState, initial_rng
from training import mesh as mesh_lib
from training import optim
from training import preemption
from training.metrics import MetricsLogger, check_wandb
from workdir import files as wd_files
from workdir import mesh as wd_mesh
from workdir import runinfo


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray):
  """Weighted token cross entropy: (sum of losses, sum of weights). logits [B, T, V] fp32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


PACKING_KEYS = ('segment_ids', 'positions', 'source_segment_ids', 'source_positions')


def model_loss(model: nnx.Module, batch: dict, rng: jax.Array | None = None):
  """(sum of losses, sum of weights) of a batch; encoder-decoder batches carry 'sources'.

  rng: this step's key, given to models that draw randomness in training (their
  `uses_rng` attribute is true, e.g. dropout); None at evaluation.
  """
  kwargs = {'rng': rng} if rng is not None and getattr(model, 'uses_rng', False) else {}
  # Packed rows (training/packing.py) carry segment ids and per-document positions.
  kwargs.update({k: batch[k] for k in PACKING_KEYS if k in batch})
  if 'sources' in batch:
    logits = model(batch['sources'], batch['inputs'], **kwargs)
  else:
    logits = model(batch['inputs'], **kwargs)
  return cross_entropy(logits, batch['targets'], batch['weights'])


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum_steps: int = 1):
  """(state, batch) -> (state, metrics). The loss is the mean over all weighted tokens of the
  batch, also when it is split into `grad_accum_steps` micro-batches."""

  def loss_and_grads(params, frozen, batch, rng):
    states = (params,) if frozen is None else (params, frozen)   # frozen: LoRA's base
    fn = lambda p: model_loss(nnx.merge(graphdef, p, *states[1:]), batch, rng)
    (loss_sum, weight_sum), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return loss_sum, weight_sum, grads

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    params, frozen = state.params, state.frozen
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      loss_sum, weight_sum, grads = loss_and_grads(params, frozen, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)

      def accumulate(carry, xs):
        mb, i = xs
        l, w, g = loss_and_grads(params, frozen, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, w, g)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
      (loss_sum, weight_sum, grads), _ = jax.lax.scan(
          accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
    grads = jax.tree.map(lambda g: g / weight_sum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                              opt_state=opt_state)
    return new_state, {'loss': loss_sum / weight_sum, 'grad_norm': optax.global_norm(grads)}

  return train_step


def make_eval_step(graphdef):
  """(params, batch) -> (sum of losses, sum of weights)."""
  return lambda params, batch: model_loss(nnx.merge(graphdef, params), batch)


@dataclasses.dataclass
class Setup:
  """What a run needs besides its data: the model's graphdef, jitted steps and shardings."""
  config: object
  mesh: jax.sharding.Mesh
  graphdef: object
  abstract_state: TrainState     # of jax.ShapeDtypeStruct carrying their shardings
  state_shardings: TrainState    # of NamedSharding
  init_state: callable
  state_from_params: callable   # (params, step) -> a train state with a fresh optimizer state;
                                # with LoRA the params become `frozen`, fresh adapters train
  train_step: callable
  eval_step: callable
  schedule: callable             # step -> learning rate, jitted: one program, not an eager op
                                 # (and its compilation) per operation of optax's schedule


def setup(config, devices=None) -> Setup:
  """Builds the mesh, the abstract (sharded) train state and the jitted steps; compiles nothing."""
  mesh = wd_mesh.make_mesh(config.mesh, devices)
  rules = wd_mesh.rules_of(config.mesh)
  mesh_lib.check_batch(config, tuple(mesh.shape.values()), jax.process_count())
  in_mesh = functools.partial(wd_mesh.under_rules, mesh=mesh, rules=rules)
  tx = optim.make_optimizer(config.train)

  with_lora = bool(lora.targets_of(ModelConfig.from_config(config.model)))

  def new_state(params, frozen, step):
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state=tx.init(params), rng=initial_rng(config.train.seed),
                      frozen=frozen)

  def create_state():
    params = nnx.state(build_model(config, nnx.Rngs(config.train.seed)), nnx.Param)
    return new_state(*(lora.split(params) if with_lora else (params, None)), 0)

  def state_from_params(params, step):
    if not with_lora:
      return new_state(params, None, step)
    # LoRA on these params: the model's fresh adapters (XLA drops the unused base init).
    adapters = lora.split(nnx.state(build_model(config, nnx.Rngs(config.train.seed)),
                                    nnx.Param))[0]
    return new_state(adapters, params, step)

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  abstract = jax.eval_shape(create_state)
  shardings = wd_mesh.state_shardings(abstract, mesh, rules)
  if not with_lora:   # state_shardings replicates a None leaf; `frozen` stays None
    shardings = shardings.replace(frozen=None)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  batch_sh, rep = mesh_lib.batch_sharding(mesh), wd_mesh.replicated(mesh)
  step_fn = guards.skip_nonfinite(make_train_step(graphdef, tx, config.train.grad_accum_steps))
  train_step = jax.jit(in_mesh(step_fn),
                       in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep),
                       donate_argnums=0)
  eval_step = jax.jit(in_mesh(make_eval_step(graphdef)),
                      in_shardings=(shardings.model_params(), batch_sh), out_shardings=rep)
  from_params = jax.jit(in_mesh(state_from_params),
                        in_shardings=(shardings.frozen if with_lora else shardings.params, None),
                        out_shardings=shardings, donate_argnums=0)
  return Setup(config, mesh, graphdef, abstract, shardings,
               jax.jit(in_mesh(create_state), out_shardings=shardings), from_params, train_step,
               eval_step, jax.jit(optim.learning_rate_schedule(config.train)))


def evaluate(s: Setup, params, batches: list) -> float:
  """Mean held-out loss (nats/token) over fixed batches."""
  total, weight = 0.0, 0.0
  for batch in batches:
    loss_sum, weight_sum = s.eval_step(params, mesh_lib.put_batch(mesh_lib.process_rows(batch),
                                                                  s.mesh))
    total, weight = total + float(loss_sum), weight + float(weight_sum)
  return total / max(weight, 1.0)


def load_data(config, tokenizer) -> tuple:
  """(training IterDataset, fixed held-out batches, unigram-entropy baseline) of
  `config.data.task`: the LM corpus, or encoder-decoder examples (training/seq2seq_data.py)."""
  d, t = config.data, config.train
  pi, pc = jax.process_index(), jax.process_count()
  if d.task != 'lm':
    if tokenizer.pad_id != config.model.pad_id:
      raise schema.ConfigError(f'model.pad_id={config.model.pad_id} is not the pad id of '
                               f'data.tokenizer={d.tokenizer!r} ({tokenizer.pad_id}).')
    data = seq2seq_data.load(config, tokenizer, process_index=pi, process_count=pc)
    return data.train, data.eval, data.baseline
  if d.corpus == 'mixture':   # per-source held-out sets: a mixture.MixtureEval
    return mixture.lm_data(d, t, tokenizer.pad_id, process_index=pi, process_count=pc)
  return data_lib.lm_data(d, t, tokenizer.pad_id, process_index=pi, process_count=pc)


# An extra held-out metric: (graphdef, params, batches, tokenizer, put) -> {name: value}, where
# put(batch) places a host batch on the mesh. The CLI passes generation-based ones (e.g.
# sampling.encdec.eval_exact_match), so that training never imports sampling.
EvalFn = Callable[..., dict]


def eval_metrics(s: Setup, params, batches, tokenizer, extra: Sequence[EvalFn] = ()) -> dict:
  """{'eval_loss'} (and 'eval_loss/NAME' per source of a mixture.MixtureEval) and whatever the
  `extra` metrics add."""
  if isinstance(batches, mixture.MixtureEval):
    line = batches.metrics(lambda b: evaluate(s, params, b))
    batches = batches.batches
  else:
    line = {'eval_loss': evaluate(s, params, batches)}
  put = lambda b: mesh_lib.put_batch(mesh_lib.process_rows(b), s.mesh)
  for fn in extra:
    line.update(fn(s.graphdef, params, batches, tokenizer, put))
  return line


def train(config, workdir: str, *, stop_after: int | None = None,
          extra_evals: Sequence[EvalFn] = ()) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint when there is one.

  stop_after: leave after this global step (checkpointed) without finishing the schedule.
  SIGTERM/SIGINT: the current step finishes, is checkpointed, and train returns early with
  'stopped' set to the signal's name. A NaN/Inf step is skipped; train.nonfinite='stop' raises
  guards.NonfiniteError after train.max_nonfinite_steps in a row.
  extra_evals: more held-out metrics, computed at every evaluation (see EvalFn).
  Returns {'step', 'loss', 'eval_loss', 'unigram_entropy', 'stopped'} and the extra metrics.
  """
  schema.validate(config)
  t = config.train
  changes = ckpt_lib.check_resume(workdir, config)
  if changes is not None and ckpt_lib.Checkpointer.steps(workdir):
    optim.check_resumed_schedule(ckpt_lib.load_config(workdir).train, t)
  check_wandb(t.wandb_project)
  if optim.short_run_warning(t) and jax.process_index() == 0:
    logging.warning(optim.short_run_warning(t))
  tokenizer = make_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise schema.ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                             f'tokenizer vocabulary ({tokenizer.vocab_size}).')
  train_ds, eval_set, baseline = load_data(config, tokenizer)
  s = setup(config)
  existing = len(ckpt_lib.Checkpointer.steps(workdir))
  guards.check_workdir(workdir, guards.state_bytes(s.abstract_state.replace(frozen=None)),
                       t.keep_checkpoints, existing)   # what a checkpoint holds
  wd_files.write_config(workdir, config)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  data_iter = iter(train_ds)
  nonfinite = guards.NonfiniteGuard(t.nonfinite, t.max_nonfinite_steps)
  fresh_optimizer = False
  if changes is not None and checkpointer.latest_step() is not None:
    state = checkpointer.restore(s.abstract_state, data_iter)
    nonfinite.in_a_row = checkpointer.restored_meta.get('nonfinite_in_a_row', 0)
    if state.is_params_only:  # parameters only (an import), or LoRA starts on these params
      state, fresh_optimizer = s.state_from_params(state.params, checkpointer.restored_step), True
  else:
    state = s.init_state()
    if state.has_frozen:   # LoRA from scratch: the random base, written once
      checkpointer.save_base(0, state.frozen)
  start = int(state.step)
  if jax.process_index() == 0:
    runinfo.record_launch(workdir, config, tokenizer, s.mesh, start)
  end = t.steps if stop_after is None else min(t.steps, stop_after)
  logger = MetricsLogger(workdir, t.steps, start, enabled=jax.process_index() == 0,
                         wandb_project=t.wandb_project, run_config=config.to_dict())
  if fresh_optimizer and checkpointer.lora_base is not None:
    m = config.model
    logger.print(f'LoRA: training rank-{m.lora_rank} adapters on {m.lora_targets} over the '
                 f'parameters of {workdir} at step {start}, which stay frozen (never rewritten); '
                 'the adapters start with a fresh optimizer state.')
  elif fresh_optimizer:
    logger.print(f'Fine-tuning the parameters of {workdir} (step {start}) with a fresh optimizer '
                 'state: the checkpoint holds parameters only.')
  elif start:
    logger.print(f'Resuming {workdir} from step {start}'
                 + (f' with changes: {"; ".join(changes)}.' if changes else '.'))
  tokens_per_step = t.batch_size * config.data.seq_len
  # MFU = model FLOPs per token x tokens/s over the mesh's peak (training/flops.py).
  flops_per_token = flops.flops_per_token(config, s.abstract_state.model_params())
  peak, _ = flops.peak_flops(list(s.mesh.devices.flat), config.model.dtype)
  last_time, last_step, metrics, evals = time.time(), start, None, {}
  with preemption.StopSignal() as stop, contextlib.closing(checkpointer), \
      contextlib.closing(logger):
    for step in range(start + 1, end + 1):
      batch = mesh_lib.put_batch(next(data_iter), s.mesh)
      state, metrics = s.train_step(state, batch)
      nonfinite.observe(step, metrics['skipped_steps'])
      if step == start + 1:  # throughput excludes compilation
        jax.block_until_ready(metrics)
        last_time, last_step = time.time(), step
      if step % t.log_every == 0 or step == end:
        metrics, now = jax.device_get(metrics), time.time()
        line = {**metrics, 'learning_rate': s.schedule(step - 1),
                'skipped_steps': nonfinite.take_skipped()}
        if step > last_step:
          line['tokens_per_sec'] = tokens_per_step * (step - last_step) / (now - last_time)
          line['mfu'] = flops_per_token * line['tokens_per_sec'] / peak
        logger.write(step, line)
        last_time, last_step = now, step
      if step % t.eval_every == 0 or step == t.steps:
        evals = eval_metrics(s, state.model_params(), eval_set, tokenizer, extra_evals)
        logger.write(step, evals)
        last_time = time.time()  # evaluation time is not training throughput
      stopping = stop.agree()
      if step % t.checkpoint_every == 0 or step == end or stopping:
        nonfinite.settle()  # a run stopped for NaNs saves nothing after them
        checkpointer.save(step, state, data_iter, meta={'nonfinite_in_a_row': nonfinite.in_a_row})
      logger.advance(step)
      if stopping:
        note = f'Stopped by {stop.name} after step {step}; checkpoint saved in {workdir}.'
        if jax.process_index() == 0:
          logger.print(note)
        else:   # each process says where it stopped (the same step: StopSignal.agree)
          print(f'process {jax.process_index()}: {note}', file=sys.stderr)
        break
  result = {'step': int(state.step), 'loss': None if metrics is None else float(metrics['loss']),
            'eval_loss': None, 'unigram_entropy': baseline, **evals, 'stopped': stop.name or None}
  if int(state.step) == t.steps and jax.process_index() == 0:
    if not evals:
      result.update(eval_metrics(s, state.model_params(), eval_set, tokenizer, extra_evals))
    eval_loss = result['eval_loss']
    unit = 'nats/byte' if tokenizer.name == 'byte' else 'nats/token'
    print(f'Held-out loss {eval_loss:.4f} {unit}; unigram baseline of the same split '
          f'{result["unigram_entropy"]:.4f} {unit} (ratio {eval_loss / result["unigram_entropy"]:.2f}).')
    if 'eval_exact_match' in result:
      print(f'Held-out exact match {100 * result["eval_exact_match"]:.1f}% '
            f'(greedy decoding, {config.data.task}).')
  return result
