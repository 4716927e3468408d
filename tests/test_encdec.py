"""Encoder-decoder model against independent references: einsum-softmax cross attention,
padding invariance, bidirectional encoder, shared embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import encdec, schema
from models import build_model, layers

ARCHS = ['modern', 'paper']


def config(variant='addition,tiny', overrides=None):
  return schema.validate(schema.apply_overrides(encdec.get_config(variant), overrides or {}))


def random_tokens(key, shape, vocab=256):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab)


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_cross_attention_equals_einsum_softmax_reference(num_kv_heads):
  cfg = config(overrides={'model.num_kv_heads': num_kv_heads}).model
  attn = layers.Attention(cfg, nnx.Rngs(0), rope=True)   # rope never applies to cross attention
  b, t, s, d = 2, 5, 7, cfg.d_model
  x = np.asarray(jax.random.normal(jax.random.key(1), (b, t, d)))
  ctx = np.asarray(jax.random.normal(jax.random.key(2), (b, s, d)))
  ctx_mask = np.ones((b, s), bool)
  ctx_mask[1, 4:] = False
  got = attn(jnp.asarray(x), jnp.zeros((b, t), jnp.int32), context=jnp.asarray(ctx),
             context_mask=jnp.asarray(ctx_mask))

  w = {n: np.asarray(getattr(attn, n).kernel.value) for n in 'qkvo'}
  group = cfg.num_heads // num_kv_heads
  q = np.einsum('btd,dnh->btnh', x, w['q'])
  k = np.repeat(np.einsum('bsd,dkh->bskh', ctx, w['k']), group, axis=2)
  v = np.repeat(np.einsum('bsd,dkh->bskh', ctx, w['v']), group, axis=2)
  scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(ctx_mask[:, None, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum('btnh,nhD->btD', np.einsum('bnts,bsnh->btnh', probs, v), w['o'])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_source_padding_changes_nothing(arch):
  """Pad tokens appended to a source change no decoder logit and no encoder output at real
  source positions."""
  cfg = config(f'addition,{arch},tiny')
  model = build_model(cfg, nnx.Rngs(0))
  pad = cfg.model.pad_id
  sources = random_tokens(0, (3, 6))
  sources = sources.at[1, 4:].set(pad)            # rows of different real lengths
  targets = random_tokens(1, (3, 5))
  padded = jnp.concatenate([sources, jnp.full((3, 4), pad, sources.dtype)], axis=1)
  np.testing.assert_allclose(model(padded, targets), model(sources, targets), atol=1e-5)
  enc_a, mask_a = model.encode(sources)
  enc_b, _ = model.encode(padded)
  real = np.asarray(mask_a)
  np.testing.assert_allclose(np.asarray(enc_b[:, :6])[real], np.asarray(enc_a)[real], atol=1e-5)
  # and the pad id really is what is masked: a non-pad token there does change the output
  other = padded.at[:, -1].set((pad + 1) % cfg.model.vocab_size)
  assert float(jnp.max(jnp.abs(model(other, targets) - model(padded, targets)))) > 1e-5


@pytest.mark.parametrize('arch', ARCHS)
def test_encoder_is_bidirectional_and_decoder_causal(arch):
  model = build_model(config(f'addition,{arch},tiny'), nnx.Rngs(0))
  sources, targets = random_tokens(0, (2, 6)), random_tokens(1, (2, 5))
  base = model(sources, targets)
  later_source = model(sources.at[:, 5].set((sources[:, 5] + 1) % 256), targets)
  assert float(jnp.max(jnp.abs(later_source[:, 0] - base[:, 0]))) > 1e-5
  later_target = model(sources, targets.at[:, 3].set((targets[:, 3] + 1) % 256))
  np.testing.assert_allclose(later_target[:, :3], base[:, :3], atol=1e-6)


def test_one_shared_embedding_table():
  cfg = config()
  params = nnx.state(build_model(cfg, nnx.Rngs(0)), nnx.Param)
  tables = [p for p in jax.tree.leaves(params) if p.shape == (cfg.model.vocab_size,
                                                              cfg.model.d_model)]
  assert len(tables) == 1


def test_config_errors_name_the_field():
  with pytest.raises(schema.ConfigError, match='data.source_len=600 exceeds model.max_len'):
    config(overrides={'data.source_len': 600, 'model.max_len': 512})
  with pytest.raises(schema.ConfigError, match="data.task='lm' is for model.kind=decoder"):
    config(overrides={'data.task': 'lm'})
  with pytest.raises(schema.ConfigError, match='data.files is empty'):
    config('pairs,tiny')
  with pytest.raises(ValueError, match='TASK'):
    encdec.get_config('adition')
