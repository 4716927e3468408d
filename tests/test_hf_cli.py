"""Bad Hugging Face input (one clear error naming the tensor, field or file; nothing written) and
the user's command-line path: import, sample, fine-tune, export. The models and references are
tests/hf_models.py's.
"""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from interop.convert import export_hf, import_hf
from interop.hf_config import InteropError
from interop.hf_params import SafetensorsFolder, TensorSpec
from tests.conftest import run_cli
from tests.hf_models import (ATOL, COMMON, PROMPT, RANDOM_TOKENS, TEXT, hf_greedy, hf_logits,
                             our_logits, reference_tokenizer, save_models, torch, transformers)
from workdir.load import load_workdir


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """The families these tests read."""
  return save_models(tmp_path_factory, ('llama', 'mistral', 'qwen2'))


# --- bad input: one clear error naming the tensor or field, nothing written ------------------

def _corrupt_copy(src, dst, edit_config=None, edit_tensors=None):
  shutil.copytree(src, dst)
  if edit_config:
    path = os.path.join(dst, 'config.json')
    with open(path) as f:
      cfg = json.load(f)
    edit_config(cfg)
    with open(path, 'w') as f:
      json.dump(cfg, f)
  if edit_tensors:
    path = os.path.join(dst, 'model.safetensors')
    folder = SafetensorsFolder(dst)
    specs = [TensorSpec(k, k, 'same', s) for k, (_, _, s) in folder.entries.items()]
    tensors = {s.hf: x for s, x in folder.read(specs, np.float32)}
    edit_tensors(tensors)
    save_file(tensors, path, metadata={'format': 'pt'})
  return dst


TENSOR = 'model.layers.1.mlp.up_proj.weight'
BAD_INPUTS = {
    'architecture': (dict(edit_config=lambda c: c.update(architectures=['GPT2LMHeadModel'])),
                     ['architectures', 'GPT2LMHeadModel']),
    'missing_tensor': (dict(edit_tensors=lambda t: t.pop(TENSOR)), ['missing', TENSOR]),
    'shape': (dict(edit_tensors=lambda t: t.update({TENSOR: t[TENSOR][:, :32]})),
              [TENSOR, '[96, 32]', '[96, 64]']),
    'dtype': (dict(edit_tensors=lambda t: t.update({TENSOR: t[TENSOR].astype(np.int8)})),
              [TENSOR, 'I8']),
    'rope_type': (dict(edit_config=lambda c: c['rope_parameters'].update(rope_type='yarn')),
                  ['rope_type', 'yarn']),
    'missing_field': (dict(edit_config=lambda c: c.pop('hidden_size')), ['hidden_size']),
    'layer_types': (dict(edit_config=lambda c: c.update(layer_types=['sliding_attention'])),
                    ['layer_types', '2 entries']),
    'activation': (dict(edit_config=lambda c: c.update(hidden_act='relu')),
                   ['hidden_act', 'relu']),
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_names_the_problem_and_writes_nothing(hf, tmp_path, case):
  edits, words = BAD_INPUTS[case]
  src = _corrupt_copy(hf['qwen2'][1], str(tmp_path / 'hf'), **edits)
  workdir = tmp_path / 'wd'
  with pytest.raises(InteropError) as e:
    import_hf(src, str(workdir))
  for word in words:
    assert word in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ['hf']   # no workdir, no temporary folder


def test_import_refuses_a_used_workdir(hf, tmp_path):
  (tmp_path / 'notes.txt').write_text('keep me')
  with pytest.raises(InteropError, match='not empty'):
    import_hf(hf['mistral'][1], str(tmp_path))
  assert os.listdir(tmp_path) == ['notes.txt']


def _run(*args, timeout=300):
  return run_cli(*args, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_truncated_safetensors_and_unsupported_tokenizer(hf, tmp_path):
  """A cut-off model.safetensors, and slow-tokenizer files without tokenizer.json: one error
  naming the file, nothing written."""
  src = shutil.copytree(hf['qwen2'][1], str(tmp_path / 'hf'))
  weights = os.path.join(src, 'model.safetensors')
  data = open(weights, 'rb').read()
  with open(weights, 'wb') as f:
    f.write(data[:len(data) - 1000])
  with pytest.raises(InteropError, match='model.safetensors'):
    import_hf(src, str(tmp_path / 'wd'))
  with open(weights, 'wb') as f:
    f.write(data)
  os.remove(os.path.join(src, 'tokenizer.json'))
  for name in ('vocab.json', 'merges.txt'):
    (tmp_path / 'hf' / name).write_text('{}')
  with pytest.raises(InteropError, match='vocab.json, merges.txt are of a type not supported'):
    import_hf(src, str(tmp_path / 'wd'))
  assert sorted(os.listdir(tmp_path)) == ['hf']


def test_cli_reports_bad_input(hf, tmp_path):
  src = _corrupt_copy(hf['qwen2'][1], str(tmp_path / 'hf'),
                      edit_tensors=lambda t: t.pop(TENSOR))
  r = _run('-m', 'interop.hf', f'--from_hf={src}', f'--workdir={tmp_path / "wd"}')
  assert r.returncode != 0 and 'error:' in r.stderr and TENSOR in r.stderr, r.stderr
  assert not (tmp_path / 'wd').exists()


@pytest.mark.slow
def test_cli_import_sample_finetune_export(hf, tmp_path):
  """The user's path: CLI import, sample.py --chat (greedy = transformers), train.py fine-tunes
  the workdir, and the fine-tuned model exports and loads in transformers. --chat renders the
  template of tokenizer_config.json (its bos_token: the post-processor adds no second BOS); the
  other template file (chat_template.jinja) and plain prompts are test_text_prompt_and_chat_*'s,
  in-process, through the same prompt_ids."""
  model, folder = hf['llama']
  wd, out = str(tmp_path / 'wd'), str(tmp_path / 'out')
  r = _run('-m', 'interop.hf', f'--from_hf={folder}', f'--workdir={wd}')
  assert r.returncode == 0, r.stderr
  auto = reference_tokenizer(folder)
  rendered = auto.apply_chat_template([{'role': 'user', 'content': PROMPT}],
                                      add_generation_prompt=True, tokenize=False)
  ids = auto.encode(rendered, add_special_tokens=False)
  assert ids[0] == COMMON['bos_token_id'] and ids[1] != COMMON['bos_token_id']
  r = _run('sample.py', f'--workdir={wd}', f'--prompt={PROMPT}', '--chat', '--max_new_tokens=12',
           '--temperature=0')
  assert r.returncode == 0, r.stderr
  assert r.stderr == ''   # no library noise (orbax warned on every run before)
  new = hf_greedy(model, np.asarray([ids]), 12)[0, len(ids):].tolist()
  new = new[:new.index(COMMON['eos_token_id'])] if COMMON['eos_token_id'] in new else new
  assert r.stdout.splitlines()[-1] == rendered + auto.decode(new, skip_special_tokens=True)
  (tmp_path / 'corpus.txt').write_text(TEXT * 30)
  r = _run('train.py', f'--config=configs/finetune.py:{wd}', f'--workdir={wd}',
           '--config.data.corpus=files', f'--config.data.files={tmp_path / "corpus.txt"}',
           '--config.data.seq_len=32', '--config.train.steps=3', '--config.train.warmup_steps=1',
           '--config.train.batch_size=2',
           '--config.train.log_every=1', '--config.train.eval_every=3',
           '--config.train.eval_batches=1', '--config.train.learning_rate=1e-3')
  assert r.returncode == 0, r.stderr
  assert 'with a fresh optimizer state: the checkpoint holds parameters only' in r.stdout
  assert os.path.isdir(os.path.join(wd, 'checkpoints', '3', 'train'))  # now a resumable run
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    losses = [json.loads(line)['loss'] for line in f if '"loss"' in line]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert load_workdir(wd).step == 3
  export_hf(wd, out)
  tuned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_logits(tuned, RANDOM_TOKENS), our_logits(wd, RANDOM_TOKENS),
                             atol=ATOL, rtol=0)
  assert np.abs(hf_logits(tuned, RANDOM_TOKENS) - hf_logits(model, RANDOM_TOKENS)).max() > ATOL
