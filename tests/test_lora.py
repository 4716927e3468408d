"""LoRA (models/lora.py) against PEFT and transformers, and its training guarantees.

A tiny random transformers Llama is imported, LoRA-trained a few steps (so B != 0), and then:
its adapters exported with --to_peft and loaded by `peft` onto the transformers model give our
logits (<= 1e-4); the --merge_lora export loaded by transformers gives them too; the imported
base is bitwise unchanged; the optimizer state covers the adapters only. Exact resume and
turning LoRA on in a trained run use the tiny byte-level model; the encoder-decoder trains with
adapters too.
"""
import json
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
  merged = lora.merge(params, lora.scale_of(cfg.model))
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
