"""Config validation: each bad field gives one error naming it, before anything compiles."""
import subprocess
import sys

import pytest

from configs import default, schema
from configs.schema import ConfigError
from tests.conftest import ROOT
from workdir import resume


@pytest.mark.parametrize('variant', ['tiny', 'small', 'medium'])
def test_variants_validate(variant):
  schema.validate(default.get_config(variant))


@pytest.mark.parametrize('overrides, message', [
    ({'model.num_heads': 8, 'model.num_kv_heads': 3},
     'model.num_heads=8 must be divisible by model.num_kv_heads=3 (allowed num_kv_heads: 1, 2, 4, 8)'),
    ({'data.seq_len': 0}, 'data.seq_len=0: must be a positive integer'),
    ({'data.seq_len': -5}, 'data.seq_len=-5: must be a positive integer'),
    ({'model.d_model': 0}, 'model.d_model=0: must be a positive integer'),
    ({'model.positional': 'alibi'},
     "model.positional='alibi' is not allowed; choose one of rope, sinusoidal, learned"),
    ({'model.kind': 'moe'}, "model.kind='moe' is not allowed; choose one of decoder, encoder_decoder"),
    ({'data.seq_len': 4096}, 'data.seq_len=4096 exceeds model.max_len=256'),
    ({'data.corpus': 'files', 'data.files': ' '}, 'data.files is empty'),
    ({'train.batch_size': 6, 'train.grad_accum_steps': 4},
     'train.batch_size=6 must be divisible by train.grad_accum_steps=4'),
    ({'mesh.fsdp': 0}, 'mesh.fsdp=0: must be a positive integer or -1'),
])
def test_bad_values_name_the_field(tiny_config, overrides, message):
  with pytest.raises(ConfigError) as e:
    schema.validate(tiny_config(overrides))
  assert message in str(e.value)


@pytest.mark.parametrize('key, suggestion', [
    ('model.num_kv_head', 'model.num_kv_heads'),
    ('model.rope_thetta', 'model.rope_theta'),
    ('train.num_kv_heads', 'model.num_kv_heads'),
    ('train.lr', None),
])
def test_unknown_key_rejected_with_suggestion(tiny_config, key, suggestion):
  with pytest.raises(ConfigError) as e:
    tiny_config({key: 1})
  assert f'unknown key `{key}`' in str(e.value)
  if suggestion:
    assert f'did you mean `{suggestion}`?' in str(e.value)


def test_unknown_key_in_config_file_rejected(tiny_config):
  config = tiny_config()
  with config.unlocked():
    config.model.n_layers = 3
  with pytest.raises(ConfigError, match='unknown key `model.n_layers`'):
    schema.validate(config)


def test_json_round_trip_and_shape_differences(tiny_config):
  config = tiny_config()
  assert schema.from_json(schema.to_json(config)).to_dict() == config.to_dict()
  other = tiny_config({'model.d_model': 128, 'model.num_kv_heads': 1, 'train.steps': 99})
  assert resume.shape_differences(config, other) == [
      'model.d_model: 64 (saved) != 128', 'model.num_kv_heads: 2 (saved) != 1']


def test_cli_override_and_error_before_compile(tmp_path):
  """--config.a.b=v overrides reach validation; the error is one line and nothing is written."""
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/default.py:tiny', f'--workdir={workdir}',
       '--config.model.num_kv_heads=3'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: model.num_heads=4 must be divisible by model.num_kv_heads=3 '
      '(allowed num_kv_heads: 1, 2, 4).')
  assert not workdir.exists()


def test_typed_model_config_mirrors_the_schema(tiny_config):
  """models/config.py's ModelConfig has exactly base.py's model fields (no defaults of its own),
  resolves the None-means-derived fields, and names what a mismatched mapping lacks or adds."""
  import dataclasses

  from configs.base import base_config
  from models.config import ModelConfig
  from models.positional import RopeScaling
  assert {f.name for f in dataclasses.fields(ModelConfig)} == set(base_config().model.keys())
  assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ModelConfig))
  cfg = tiny_config({'model.attention_bias': True})
  typed = ModelConfig.from_config(cfg.model)
  assert typed.head_dim == cfg.model.d_model // cfg.model.num_heads
  assert typed.attention_out_bias is True and typed.rope_scaling == RopeScaling()
  assert ModelConfig.from_config(typed) is typed
  assert hash(typed) == hash(ModelConfig.from_config(cfg.model))
  explicit = ModelConfig.from_config(tiny_config({'model.head_dim': 8, 'model.attention_bias': True,
                                                  'model.attention_out_bias': False}).model)
  assert (explicit.head_dim, explicit.attention_out_bias) == (8, False)
  values = cfg.model.to_dict()
  del values['d_model']
  values['colour'] = 'red'
  with pytest.raises(ValueError, match=r'missing model\.d_model; unknown model\.colour'):
    ModelConfig.from_config(values)
