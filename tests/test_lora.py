"""LoRA (models/lora.py) against PEFT and transformers, and its training guarantees.

A tiny random transformers Llama is imported, LoRA-trained a few steps (so B != 0), and then:
its adapters exported with --to_peft and loaded by `peft` onto the transformers model give our
logits (<= 1e-4); the --merge_lora export loaded by transformers gives them too; the imported
base is bitwise unchanged; the optimizer state covers the adapters only. Exact resume and
turning LoRA on in a trained run use the tiny byte-level model; the encoder-decoder trains with
adapters too.
"""
import os
import shutil

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default, encdec, schema  # noqa: E402
from models import build_model, lora  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from training import loop  # noqa: E402
from workdir import checkpoints, integrity  # noqa: E402
from workdir.load import load_workdir  # noqa: E402

ATOL = 1e-4
LORA = {'model.lora_rank': 4, 'model.lora_alpha': 8.0,
        'model.lora_targets': 'q,k,v,o,gate,up,down'}
TOKENS = np.array([[1, 5, 9, 20, 33, 7, 2, 40, 11, 60, 3, 17]])


def _tiny(overrides=None):
  return schema.apply_overrides(default.get_config('tiny'), overrides or {})


def _adapters(params) -> dict:
  return {'.'.join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(lora.split(params)[0])}


def _leaves(tree) -> list:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_adapters_sit_on_the_named_projections_and_start_as_the_base():
  """Every name in schema.LORA_TARGETS is a projection of both model kinds (cross attention
  included); the base parameters are those of the same seed without LoRA; B = 0, so the
  logits are the base model's; A is PEFT's kaiming-uniform (|A| <= 1/sqrt(fan_in))."""
  for cfg, call in ((_tiny(), lambda m: m(jnp.asarray(TOKENS))),
                    (schema.apply_overrides(encdec.get_config('reversal'), {}),
                     lambda m: m(jnp.asarray(TOKENS), jnp.asarray(TOKENS[:, :6])))):
    plain = build_model(cfg, nnx.Rngs(0))
    tuned = build_model(schema.apply_overrides(cfg, LORA), nnx.Rngs(0))
    adapters, base = lora.split(nnx.state(tuned, nnx.Param))
    for a, b in zip(_leaves(nnx.state(plain, nnx.Param)), _leaves(base)):
      np.testing.assert_array_equal(a, b)
    names = {path[-3] for path, _ in nnx.to_flat_state(adapters)}
    assert names == set(schema.LORA_TARGETS)
    if cfg.model.kind == 'encoder_decoder':
      assert any('cross_attn' in path for path, _ in nnx.to_flat_state(adapters))
    np.testing.assert_array_equal(np.asarray(call(plain)), np.asarray(call(tuned)))
    for path, v in nnx.to_flat_state(adapters):
      x = np.asarray(v.get_value())
      if path[-1] == 'b':
        assert not x.any()
      else:
        fan_in = x.size // x.shape[-1]
        assert 0.5 / np.sqrt(fan_in) < np.abs(x).max() <= 1 / np.sqrt(fan_in)


def test_merge_equals_the_adapted_model():
  """W + (alpha / r) A . B in the kernels (models/lora.py `merge`) computes what the adapters
  compute, for every projection layout (q [D, N, H], o [N, H, D], MLP)."""
  cfg = _tiny(LORA)
  graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
  key = iter(jax.random.split(jax.random.key(1), 100))
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(key), x.shape), params)
  plain = nnx.graphdef(build_model(_tiny(), nnx.Rngs(0)))
  merged = lora.merge(params, lora.scale_of(ModelConfig.from_config(cfg.model)))
  assert not lora.split(merged)[0]
  np.testing.assert_allclose(np.asarray(nnx.merge(plain, merged)(jnp.asarray(TOKENS))),
                             np.asarray(nnx.merge(graphdef, params)(jnp.asarray(TOKENS))),
                             atol=ATOL, rtol=0)


@pytest.mark.parametrize('targets, words', [
    ('q,x', "'x' is not a LoRA target"), ('', "'' is not a LoRA target"),
    ('query', "'query'"), ('q,,v,down,', None)])
def test_bad_targets_are_one_error_naming_the_field(tmp_path, targets, words):
  cfg = _tiny({**LORA, 'model.lora_targets': targets})
  if words is None:
    schema.validate(cfg)   # empty items are ignored
    return
  with pytest.raises(schema.ConfigError) as e:
    loop.train(cfg, str(tmp_path / 'wd'))   # refused before anything is built or written
  assert 'model.lora_targets' in str(e.value) and words in str(e.value)
  assert 'q, k, v, o, gate, up, down' in str(e.value)
  assert not (tmp_path / 'wd').exists()


def test_gate_without_a_gated_mlp_names_no_projection():
  with pytest.raises(schema.ConfigError, match=r"model.lora_targets=.*'gate'.*"
                     r"model.mlp_activation='gelu' has no gate.*q, k, v, o, up, down"):
    schema.validate(_tiny({**LORA, 'model.mlp_activation': 'gelu'}))
  with pytest.raises(schema.ConfigError, match='model.lora_rank'):
    schema.validate(_tiny({'model.lora_rank': -1}))


# --- A LoRA fine-tune of an imported transformers Llama -------------------------------------

def _finetune_config(wd, corpus, overrides=None):
  from workdir import files
  return schema.apply_overrides(files.load_config(wd), {
      **LORA, 'data.corpus': 'files', 'data.files': corpus, 'data.seq_len': 16,
      'train.batch_size': 4, 'train.steps': 4, 'train.warmup_steps': 1,
      'train.learning_rate': 3e-2, 'train.log_every': 1, 'train.eval_every': 100,
      'train.eval_batches': 1, 'train.checkpoint_every': 2, **(overrides or {})})


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """A tiny random transformers Llama, imported, then LoRA-trained 4 steps; with the base
  parameters and the step-0 manifest as they were before training."""
  pytest.importorskip('peft')
  from tests.hf_models import TEXT, make_hf_model, write_tokenizer
  from interop.convert import import_hf
  root = tmp_path_factory.mktemp('lora_llama')
  hf_dir, wd = str(root / 'hf'), str(root / 'wd')
  model = make_hf_model('llama')
  model.save_pretrained(hf_dir)
  write_tokenizer(hf_dir)
  import_hf(hf_dir, wd)
  (root / 'corpus.txt').write_text(TEXT * 30)
  base = load_workdir(wd).params
  with open(os.path.join(checkpoints.step_dir(wd, 0), 'sha256.json')) as f:
    manifest = f.read()
  cfg = _finetune_config(wd, str(root / 'corpus.txt'))
  loop.train(cfg, wd)
  return dict(hf_model=model, hf_dir=hf_dir, wd=wd, root=root, base=base, manifest=manifest,
              config=cfg)


def _our_logits(wd):
  w = load_workdir(wd)
  return np.asarray(nnx.merge(w.graphdef, w.params)(jnp.asarray(TOKENS)))


def _hf_logits(model):
  import torch
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def test_peft_loads_our_adapters_with_our_logits(llama):
  """--to_peft -> peft.PeftModel.from_pretrained on the transformers base: our logits."""
  import peft
  import transformers
  import torch
  from interop.peft import export_peft
  out = str(llama['root'] / 'peft')
  config = export_peft(llama['wd'], out)
  assert sorted(os.listdir(out)) == ['adapter_config.json', 'adapter_model.safetensors']
  assert config['r'] == 4 and config['lora_alpha'] == 8 and config['peft_type'] == 'LORA'
  assert config['base_model_name_or_path'] == os.path.abspath(llama['hf_dir'])
  base = transformers.AutoModelForCausalLM.from_pretrained(llama['hf_dir'], dtype=torch.float32)
  tuned = peft.PeftModel.from_pretrained(base, out).eval()
  b = [p for n, p in tuned.named_parameters() if 'lora_B' in n]
  assert len(b) == 2 * 7 and all(p.abs().max() > 0 for p in b)   # trained: B != 0
  ours = _our_logits(llama['wd'])
  np.testing.assert_allclose(_hf_logits(tuned), ours, atol=ATOL, rtol=0)
  assert np.abs(ours - _hf_logits(llama['hf_model'])).max() > 100 * ATOL   # adapters matter


def test_merged_export_gives_the_same_logits(llama):
  import transformers
  import torch
  from interop.convert import export_hf
  out = str(llama['root'] / 'merged')
  export_hf(llama['wd'], out, merge_lora=True)
  merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(_hf_logits(merged), _our_logits(llama['wd']), atol=ATOL, rtol=0)


def test_export_refusals_name_the_flag(llama, trained, tmp_path):
  from interop.convert import export_hf
  from interop.hf_config import InteropError
  from interop.peft import export_peft
  with pytest.raises(InteropError, match='--merge_lora.*--to_peft'):
    export_hf(llama['wd'], str(tmp_path / 'a'))
  with pytest.raises(InteropError, match='--merge_lora: .*model.lora_rank=0'):
    export_hf(trained[1], str(tmp_path / 'b'), merge_lora=True)
  with pytest.raises(InteropError, match='--to_peft: .*model.lora_rank=0'):
    export_peft(trained[1], str(tmp_path / 'c'))
  assert not os.listdir(tmp_path)


def test_base_is_bitwise_unchanged_and_only_adapters_have_optimizer_state(llama):
  wd = llama['wd']
  assert checkpoints.steps(wd) == [0, 2, 4]
  step0 = checkpoints.step_dir(wd, 0)
  with open(os.path.join(step0, 'sha256.json')) as f:
    assert f.read() == llama['manifest']
  assert integrity.verify(step0) is None   # every file of the imported step as written
  for step in (2, 4):   # LoRA steps hold adapters, never the base
    assert not checkpoints.has_item(wd, step, checkpoints.PARAMS)
    assert checkpoints.read_meta(wd, step)[checkpoints.BASE_STEP] == 0
  _, base = lora.split(load_workdir(wd).params)
  for a, b in zip(_leaves(llama['base']), _leaves(base)):
    np.testing.assert_array_equal(a, b)
  from training import checkpoint as ckpt_lib
  s = loop.setup(llama['config'])
  state = ckpt_lib.Checkpointer(wd, read_only=True).restore(s.abstract_state)
  for a, b in zip(_leaves(llama['base']), _leaves(state.frozen)):
    np.testing.assert_array_equal(a, b)
  adapters = {tuple(x.shape) for x in jax.tree.leaves(state.params)}
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert {tuple(x.shape) for x in moments} == adapters
  assert lora.count(moments) == 2 * lora.count(state.params)   # Adam's mu and nu
  assert lora.count(state.params) < lora.count(base) / 10


# --- Resume, LoRA on a trained run, the encoder-decoder ---------------------------------------

def test_lora_on_a_trained_run_resumes_exactly(trained, tmp_path, capsys):
  """A trained run (no LoRA, step 20) resumed with LoRA on: accepted, its step-20 parameters
  become the frozen base (kept although keep_checkpoints=1); 20 -> 24 in one go equals
  20 -> 22, then 22 -> 24, bitwise (adapters, optimizer state)."""
  cfg, src = trained
  cfg = schema.apply_overrides(cfg, {**LORA, 'train.steps': 24, 'train.keep_checkpoints': 1,
                                     'train.checkpoint_every': 2})
  runs = {}
  for name, stops in (('once', (None,)), ('twice', (22, None))):
    wd = str(tmp_path / name)
    shutil.copytree(src, wd)
    for stop in stops:
      loop.train(cfg, wd, stop_after=stop)
    runs[name] = wd
  printed = capsys.readouterr().out
  assert 'LoRA: training rank-4 adapters on q,k,v,o,gate,up,down over the parameters of' in printed
  assert 'at step 20, which stay frozen' in printed
  from training import checkpoint as ckpt_lib
  s = loop.setup(cfg)
  once, twice = (ckpt_lib.Checkpointer(runs[n], read_only=True).restore(s.abstract_state)
                 for n in ('once', 'twice'))
  assert int(once.step) == int(twice.step) == 24
  for a, b in zip(_leaves((once.params, once.opt_state)),
                  _leaves((twice.params, twice.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert checkpoints.steps(runs['twice']) == [20, 24]
  base = ckpt_lib.Checkpointer(src, read_only=True).restore(loop.setup(trained[0]).abstract_state)
  for a, b in zip(_leaves(base.params), _leaves(twice.frozen)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_encoder_decoder_trains_adapters_over_a_frozen_base(tmp_path):
  """LoRA from scratch on the encoder-decoder: the random base is written once (step 0) and
  stays as written; the adapters (self and cross attention, MLP) train; sampling reads them."""
  from interop.hf_config import InteropError
  from interop.peft import export_peft
  from sampling import encdec as encdec_sampling
  cfg = schema.apply_overrides(encdec.get_config('reversal'), {
      **LORA, 'model.num_encoder_layers': 1, 'model.num_decoder_layers': 1, 'model.d_model': 32,
      'model.mlp_dim': 64, 'model.num_heads': 2, 'model.num_kv_heads': 2,
      'train.batch_size': 8, 'train.steps': 3, 'train.warmup_steps': 1,
      'train.learning_rate': 1e-2, 'train.checkpoint_every': 3, 'train.eval_every': 100,
      'train.eval_batches': 1, 'train.log_every': 1})
  wd = str(tmp_path / 'wd')
  result = loop.train(cfg, wd)
  assert result['step'] == 3 and np.isfinite(result['loss'])
  assert checkpoints.steps(wd) == [0, 3]
  assert integrity.verify(checkpoints.step_dir(wd, 0)) is None
  w = load_workdir(wd)
  adapters, base = lora.split(w.params)
  initial = loop.setup(cfg).init_state().frozen   # the base the run started from
  for a, b in zip(_leaves(initial), _leaves(base)):
    np.testing.assert_array_equal(a, b)
  trained_b = [x for p, x in _adapters(w.params).items() if p.endswith('.b')]
  assert any('cross_attn' in p for p in _adapters(w.params))
  assert all(np.abs(x).max() > 0 for x in trained_b)
  texts = encdec_sampling.complete(w.graphdef, w.params, w.tokenizer, 'abc', max_len=32,
                                   max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0,
                                   seed=0, num_samples=1, beam_size=0, alpha=0.6)
  assert len(texts) == 1
  with pytest.raises(InteropError, match='model.kind'):
    export_peft(wd, str(tmp_path / 'peft'))
