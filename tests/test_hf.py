"""Hugging Face interop against transformers itself (torch CPU, fp32, fixed seeds, offline).

Tiny random Llama (llama3 RoPE scaling, q/k/v/o and MLP biases, sharded save), Mistral (sliding
window shorter than the test sequences), Qwen2 (q/k/v bias, tied embeddings, one sliding-window
and one full layer), Gemma (GeGLU, (1 + w) norms, scaled embeddings) and Gemma 2 (sandwich norms,
query_pre_attn_scalar, attention and final-logit soft-capping, local/global layers) models are
saved with save_pretrained, imported, and compared with transformers: logits within 1e-4, greedy
generation token for token, export -> reload -> the same logits, tokenizer ids.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interop import hf_tokenizer
from interop.convert import export_hf, import_hf
from interop.hf_params import SafetensorsFolder
from sampling.reference import generate_reference
from sampling.sampler import Sampler
from tests.hf_models import (ATOL, FAMILIES, PROMPT, RANDOM_TOKENS, TEXT, TOKENIZERS, WINDOW,
                             hf_greedy, hf_logits, our_logits, reference_tokenizer, save_models,
                             tokenizers, torch, transformers)
from text.chat import prompt_ids
from text.tokenizer import ByteTokenizer, make_tokenizer
from workdir.load import load_workdir


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """{family: (transformers model, saved folder)} of every family."""
  return save_models(tmp_path_factory, FAMILIES)


@pytest.fixture(scope='module')
def imported(hf, tmp_path_factory):
  """{family: workdir} imported from the saved folders."""
  out = {}
  for family, (_, folder) in hf.items():
    out[family] = str(tmp_path_factory.mktemp(f'wd_{family}') / 'run')
    import_hf(folder, out[family])
  return out




@pytest.mark.parametrize('family', FAMILIES)
def test_imported_logits_match_transformers(hf, imported, family):
  ref = hf_logits(hf[family][0], RANDOM_TOKENS)
  ours = our_logits(imported[family], RANDOM_TOKENS)
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
  assert np.abs(ref).max() > 1.0  # peaked enough that the comparison means something
  # The features that set the family apart really are in play: without each, logits differ.
  no_window = {'model.sliding_window': None, 'model.window_pattern': ''}
  for off in {'llama': [{'model.rope_scaling.kind': 'none'}], 'mistral': [no_window],
              'qwen2': [no_window],
              'gemma': [{'model.norm_scale_plus_one': False}, {'model.scale_embeddings': False}],
              'gemma2': [no_window, {'model.attn_logit_softcap': None},
                         {'model.final_logit_softcap': None},
                         {'model.query_pre_attn_scalar': None}]}[family]:
    assert np.abs(our_logits(imported[family], RANDOM_TOKENS, off) - ref).max() > 100 * ATOL, off


def test_imported_config_fields(imported):
  llama, mistral, qwen, gemma, gemma2 = (load_workdir(imported[f]).config.model for f in FAMILIES)
  assert (llama.rope_scaling.kind, llama.rope_scaling.factor, llama.rope_scaling.original_max_len,
          llama.rope_theta) == ('llama3', 8.0, 32, 500_000.0)
  assert llama.attention_bias and llama.mlp_bias and not llama.tie_embeddings
  assert mistral.sliding_window == WINDOW and not mistral.attention_bias
  assert qwen.attention_bias and qwen.attention_out_bias is False and qwen.tie_embeddings
  assert (qwen.norm_eps, qwen.num_kv_heads, qwen.max_len) == (1e-5, 2, 128)
  assert (qwen.sliding_window, qwen.window_pattern) == (WINDOW, 'GL')
  for m in (gemma, gemma2):
    assert (m.mlp_activation, m.norm_scale_plus_one, m.scale_embeddings, m.tie_embeddings) == (
        'geglu', True, True, True)
  assert (gemma.norm_position, gemma.sliding_window, gemma.attn_logit_softcap) == ('pre', None,
                                                                                  None)
  assert (gemma2.norm_position, gemma2.sliding_window, gemma2.window_pattern) == (
      'sandwich', WINDOW, 'LG')
  assert (gemma2.query_pre_attn_scalar, gemma2.attn_logit_softcap,
          gemma2.final_logit_softcap) == (24, 4.0, 3.0)


def test_import_writes_parameters_config_tokenizer_and_run_json_only(hf, imported):
  """No optimizer state, no data position: checkpoints/0 holds the params item alone."""
  import hashlib
  workdir = imported['llama']
  step0 = os.path.join(workdir, 'checkpoints', '0')
  assert sorted(d for d in os.listdir(step0) if os.path.isdir(os.path.join(step0, d))) == [
      'params']
  with open(os.path.join(workdir, 'run.json')) as f:
    info = json.load(f)
  with open(os.path.join(workdir, 'tokenizer.json'), 'rb') as f:
    assert info['tokenizer']['sha256'] == hashlib.sha256(f.read()).hexdigest()
  assert info['launches'][0]['imported_from'] == os.path.abspath(hf['llama'][1])
  assert info['launches'][0]['start_step'] == 0


def test_bfloat16_import_is_the_float32_one_rounded(hf, imported, tmp_path):
  """--param_dtype=bfloat16 stores each parameter rounded once from the file's values."""
  workdir = str(tmp_path / 'bf16')
  import_hf(hf['llama'][1], workdir, param_dtype='bfloat16')
  half, full = load_workdir(workdir), load_workdir(imported['llama'])
  assert half.config.model.param_dtype == 'bfloat16'
  for a, b in zip(jax.tree.leaves(half.params), jax.tree.leaves(full.params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))


NEW_TOKENS = 32


@pytest.fixture(scope='module')
def samplers(imported):
  """{family: (loaded workdir, its cached Sampler)}. The greedy and text-prompt tests send it
  requests of one shape (2 prompts of <= 16 tokens, NEW_TOKENS each): one compile per family."""
  out = {}
  for family, workdir in imported.items():
    loaded = load_workdir(workdir)
    out[family] = loaded, Sampler(loaded.graphdef, loaded.params,
                                  max_len=loaded.config.model.max_len, chunk=8)
  return out


@pytest.mark.parametrize('family', FAMILIES)
def test_greedy_generation_matches_transformers(hf, samplers, family):
  prompt = np.random.RandomState(1).randint(4, 128, (2, 8))
  expected = hf_greedy(hf[family][0], prompt, NEW_TOKENS)
  loaded, sampler = samplers[family]
  ours = generate_reference(loaded.graphdef, loaded.params, jnp.asarray(prompt, jnp.int32),
                            jax.random.key(0), max_new_tokens=NEW_TOKENS)
  assert expected.shape == (2, 40)
  np.testing.assert_array_equal(np.asarray(ours), expected)
  # The cached sampler (what sample.py uses); Mistral's window of 8 makes its ring cache wrap.
  cached = sampler.generate(list(prompt), max_new_tokens=NEW_TOKENS)
  np.testing.assert_array_equal(np.stack(cached), expected[:, 8:])


@pytest.mark.parametrize('family', FAMILIES)
def test_text_prompt_and_chat_match_transformers(hf, samplers, family):
  """sample.py's path (prompt_ids, then the cached sampler) on a text prompt: the same ids as
  transformers' tokenizer (BOS from the post-processor, add_bos_token or sentencepiece), the
  same greedy continuation as its `generate`; --chat renders and encodes as
  `apply_chat_template`."""
  model, folder = hf[family]
  loaded, sampler = samplers[family]
  auto = reference_tokenizer(folder)
  text, ids = prompt_ids(loaded.tokenizer, PROMPT)
  assert text == PROMPT and ids.tolist() == auto.encode(PROMPT)
  assert (ids[0] == 1) == (TOKENIZERS[family][0] is not None)   # BOS where transformers adds it
  # Twice, in the greedy test's request shape (its programs, already compiled).
  want = hf_greedy(model, np.asarray([ids]), NEW_TOKENS)[0, len(ids):]
  for new in sampler.generate([ids, ids], max_new_tokens=NEW_TOKENS):
    np.testing.assert_array_equal(new, want)
  messages = [{'role': 'user', 'content': PROMPT}]
  if TOKENIZERS[family][1] is None:
    with pytest.raises(ValueError, match='--chat: .*no chat template'):
      prompt_ids(loaded.tokenizer, PROMPT, chat=True)
    return
  text, ids = prompt_ids(loaded.tokenizer, PROMPT, chat=True)
  assert text == auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  want = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  assert ids.tolist() == list(want['input_ids'] if 'input_ids' in want else want)
  assert text.startswith('<s>user says the quick') and ids[0] == 1


@pytest.mark.parametrize('family', FAMILIES)
def test_export_reloads_in_transformers(hf, imported, family, tmp_path):
  model, folder = hf[family]
  out = str(tmp_path / 'out')
  export_hf(imported[family], out, max_shard_size='40KB' if family == 'llama' else '5GB')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(reloaded) is type(model)
  np.testing.assert_allclose(hf_logits(reloaded, RANDOM_TOKENS), hf_logits(model, RANDOM_TOKENS),
                             atol=1e-5, rtol=0)
  assert set(SafetensorsFolder(out).entries) == set(SafetensorsFolder(folder).entries)
  ours = make_tokenizer(load_workdir(imported[family]).config.data.tokenizer)
  exported = reference_tokenizer(out)   # the tokenizer files travel too
  text = TEXT.strip()   # sentencepiece drops a trailing space that transformers' conversion keeps
  assert exported.encode(text) == ours.encode(text, add_special_tokens=True).tolist()
  assert (exported.encode(text)[0] == ours.bos_id) == (TOKENIZERS[family][0] is not None)
  assert exported.chat_template == reference_tokenizer(folder).chat_template


def test_sharded_and_single_file_read_the_same(hf, tmp_path):
  model, sharded = hf['llama']
  single = str(tmp_path / 'single')
  model.save_pretrained(single)
  a, b = SafetensorsFolder(sharded), SafetensorsFolder(single)
  assert len({f for f, _, _ in a.entries.values()}) > 1
  assert {k: v[1:] for k, v in a.entries.items()} == {k: v[1:] for k, v in b.entries.items()}
  from interop.hf_params import TensorSpec
  specs = [TensorSpec(k, k, 'same', shape) for k, (_, _, shape) in a.entries.items()]
  for (sa, xa), (sb, xb) in zip(sorted(a.read(specs, np.float32), key=lambda t: t[0].hf),
                                sorted(b.read(specs, np.float32), key=lambda t: t[0].hf)):
    assert sa == sb
    np.testing.assert_array_equal(xa, xb)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_tensors_read_exactly(tmp_path, dtype):
  from interop.hf_params import TensorSpec
  from safetensors.torch import save_file as torch_save
  x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
  torch_save({'model.norm.weight': x}, str(tmp_path / 'model.safetensors'))
  folder = SafetensorsFolder(str(tmp_path))
  [(_, got)] = folder.read([TensorSpec('final_norm.scale', 'model.norm.weight', 'same', (3, 5))],
                           np.float32)
  np.testing.assert_array_equal(got, x.float().numpy())


def test_tokenizer_ids_match_transformers(hf, imported):
  folder, workdir = hf['llama'][1], imported['llama']
  config = load_workdir(workdir).config
  assert config.data.tokenizer == os.path.join(os.path.abspath(workdir), 'tokenizer.json')
  ours = make_tokenizer(config.data.tokenizer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, 'tokenizer.json'))
  auto = transformers.AutoTokenizer.from_pretrained(folder)  # reads tokenizer_config.json too
  for text in (TEXT, 'the fox, the dog', 'unseen words: zebra quartz!'):
    ids = ours.encode(text).tolist()
    assert ids == fast.encode(text, add_special_tokens=False)
    assert ids == auto.encode(text, add_special_tokens=False)
    assert ours.decode(np.asarray(ids)) == fast.decode(ids, skip_special_tokens=True)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (auto.bos_token_id, auto.eos_token_id,
                                                     auto.pad_token_id) == (1, 2, 3)


def test_byte_tokenizer_export_matches_ours(tmp_path):
  assert set(hf_tokenizer.bytes_to_unicode().values()) == set(
      tokenizers.pre_tokenizers.ByteLevel.alphabet())
  ours = ByteTokenizer()
  path = str(tmp_path / 'tokenizer.json')
  with open(path, 'w') as f:
    f.write(hf_tokenizer.byte_tokenizer_json(ours))
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  text = 'déjà vu: 中文 🙂 tabs\tand\nnewlines  x'
  ids = theirs.encode(text, add_special_tokens=False)
  assert ids == ours.encode(text).tolist()
  assert theirs.decode(ids) == ours.decode(np.asarray(ids)) == text
  assert theirs.convert_tokens_to_ids(['<pad>', '<bos>', '<eos>', '<extra_id_0>']) == [
      ours.pad_id, ours.bos_id, ours.eos_id, ours.sentinel(0)]
  assert len(theirs) == ours.vocab_size


