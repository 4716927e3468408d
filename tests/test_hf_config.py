"""Hugging Face config fields against transformers: RoPE scaling tables, embedding scale, legacy
keys, bias defaults, validation of the new fields and export refusals (no checkpoints needed)."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from configs import schema  # noqa: E402
from interop import hf_config  # noqa: E402
from interop.hf_config import InteropError  # noqa: E402
from models import layers, positional  # noqa: E402
from models.config import ModelConfig  # noqa: E402


@pytest.mark.parametrize('rope', [
    dict(rope_type='linear', factor=4.0),
    dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64)])
def test_rope_scaling_equals_transformers(rope):
  config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500_000.0,
                                    rope_scaling=dict(rope), max_position_embeddings=512)
  init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope['rope_type']]
  want = init(config, 'cpu')[0].numpy()
  ours = hf_config.to_config(config.to_dict(), hf_config.FAMILIES[0]).model
  scaling = positional.RopeScaling.from_config(ours.rope_scaling)
  got = np.asarray(positional.rope_inv_frequencies(128, ours.rope_theta, scaling))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = np.asarray(positional.rope_inv_frequencies(128, ours.rope_theta))
  assert np.abs(got / plain - 1).max() > 0.5  # some frequencies really are rescaled


def test_embedding_scale_in_the_embedding_dtype_as_transformers():
  """Gemma's sqrt(d_model) multiplies bfloat16 embeddings as a bfloat16 number (sqrt(3072) =
  55.43 becomes 55.5), exactly as transformers' scaled embedding does."""
  table = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
  theirs = transformers.models.gemma.modeling_gemma.GemmaTextScaledWordEmbedding(
      16, 8, 0, embed_scale=3072 ** 0.5).to(torch.bfloat16)
  with torch.no_grad():
    theirs.weight.copy_(table)
    want = theirs(torch.arange(16)).float().numpy()
  ours = layers.Embed(16, 8, std=0.02, dtype='bfloat16', param_dtype='bfloat16',
                      rngs=nnx.Rngs(0))
  ours.embedding[...] = jnp.asarray(table.float().numpy(), jnp.bfloat16)
  got = np.asarray(ours(jnp.arange(16), 3072 ** 0.5).astype(jnp.float32))
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, np.asarray(table.float().numpy()) * np.float32(3072 ** 0.5))


def test_legacy_rope_keys_and_defaults():
  """Older config.json files: `rope_theta` + `rope_scaling` with `type`; absent keys default."""
  hf = dict(architectures=['LlamaForCausalLM'], vocab_size=100, hidden_size=64,
            intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            rope_theta=1234.0, rope_scaling={'type': 'linear', 'factor': 2.0})
  m = hf_config.to_config(hf, hf_config.family_of(hf)).model
  assert (m.rope_theta, m.rope_scaling.kind, m.rope_scaling.factor) == (1234.0, 'linear', 2.0)
  assert (m.num_kv_heads, m.head_dim, m.max_len, m.tie_embeddings) == (4, 16, 2048, False)


def test_attention_out_bias_follows_attention_bias_unless_set(tiny_config):
  shapes = {}
  for qkv, out in ((False, None), (True, None), (True, False)):
    cfg = ModelConfig.from_config(
        tiny_config({'model.attention_bias': qkv, 'model.attention_out_bias': out}).model)
    attn = nnx.eval_shape(lambda c=cfg: layers.Attention(c, nnx.Rngs(0), rope=True))
    shapes[qkv, out] = (attn.q.bias is not None, attn.o.bias is not None)
  assert shapes == {(False, None): (False, False), (True, None): (True, True),
                    (True, False): (True, False)}


@pytest.mark.parametrize('overrides, message', [
    ({'model.rope_scaling.kind': 'yarn'}, 'model.rope_scaling.kind'),
    ({'model.rope_scaling.kind': 'linear', 'model.rope_scaling.factor': 0.0},
     'model.rope_scaling.factor'),
    ({'model.rope_scaling.kind': 'llama3', 'model.rope_scaling.low_freq_factor': 8.0},
     'low_freq_factor < high_freq_factor'),
    ({'model.rope_scaling.kind': 'linear', 'model.positional': 'learned'}, 'model.positional'),
    ({'model.attention_out_bias': 'no'}, 'model.attention_out_bias'),
])
def test_new_fields_validated(tiny_config, overrides, message):
  with pytest.raises(schema.ConfigError, match=message):
    schema.validate(tiny_config(overrides))


@pytest.mark.parametrize('overrides, words', [
    ({'model.norm_position': 'sandwich', 'model.mlp_activation': 'geglu',
      'model.scale_embeddings': True},
     ["LlamaForCausalLM needs model.mlp_activation='swiglu'",
      'Gemma2ForCausalLM needs model.norm_scale_plus_one=True (this model has False)']),
    ({'model.sliding_window': 4, 'model.window_pattern': 'LG'},
     ['MistralForCausalLM needs no biases, the same attention window']),
    ({'model.positional': 'learned'}, ['model.positional']),
])
def test_export_refuses_models_no_family_expresses(tiny_config, overrides, words):
  # A window no layer uses (pattern all 'G') is no window: a plain Llama.
  unused = tiny_config({'model.sliding_window': 4, 'model.window_pattern': 'G'}).model
  assert hf_config.family_for(unused).architecture == 'LlamaForCausalLM'
  with pytest.raises(InteropError) as e:
    hf_config.family_for(schema.validate(tiny_config(overrides)).model)
  for word in words:
    assert word in str(e.value)
