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
import shutil

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

from configs import schema  # noqa: E402
from interop import hf_tokenizer  # noqa: E402
from interop.convert import export_hf, import_hf  # noqa: E402
from interop.hf_config import InteropError  # noqa: E402
from interop.hf_params import SafetensorsFolder  # noqa: E402
from workdir.load import load_workdir  # noqa: E402
from sampling.reference import generate_reference  # noqa: E402
from sampling.sampler import Sampler  # noqa: E402
from training import loop  # noqa: E402
from text.chat import prompt_ids  # noqa: E402
from text.tokenizer import ByteTokenizer, make_tokenizer  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
ATOL = 1e-4
WINDOW = 8
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
FAMILIES = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM',
              dict(attention_bias=True, mlp_bias=True, rope_theta=500_000.0,
                   rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=32))),
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(sliding_window=WINDOW)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM',
              dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                   layer_types=['full_attention', 'sliding_attention'])),
    'gemma': ('GemmaConfig', 'GemmaForCausalLM', dict(head_dim=16)),
    # Caps small enough to bite at these logit sizes; layer_types default: local, then global.
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM',
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                    attn_logit_softcapping=4.0, final_logit_softcapping=3.0)),
}
TEXT = ('the quick brown fox jumps over the lazy dog while the cat sleeps near the warm fire '
        'and a bird sings on the old oak tree beside the river that runs to the sea ')


# A chat template in the style of the real ones (special token, roles, generation prompt), in
# words every tokenizer here knows.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}the model says{% endif %}")
# How each family's tokenizer adds BOS, and where its chat template is. tokenizer.json's
# post-processor (Llama 3, Mistral, Gemma); Mistral's tokenizer_config.json says
# add_bos_token=false too, which transformers 5 ignores beside a tokenizer.json (so do we);
# qwen2: no BOS; gemma2: a sentencepiece tokenizer.model with add_bos_token.
TOKENIZERS = {'llama': ('post_processor', 'tokenizer_config.json'),
              'mistral': ('post_processor', None), 'qwen2': (None, None),
              'gemma': ('post_processor', 'chat_template.jinja'),
              'gemma2': ('sentencepiece', 'tokenizer_config.json')}


def write_tokenizer(folder, how=None, chat=None):
  """A small BPE tokenizer (Metaspace, as sentencepiece models) plus its tokenizer_config.json,
  or (how='sentencepiece') a sentencepiece BPE tokenizer.model trained on the same text; with
  CHAT_TEMPLATE in `chat` (tokenizer_config.json or chat_template.jinja)."""
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>',
            'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>'}
  if how == 'sentencepiece':
    import io
    spm = pytest.importorskip('sentencepiece')
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([TEXT] * 20), model_writer=model,
                                   vocab_size=100, model_type='bpe', unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, minloglevel=2)
    with open(os.path.join(folder, 'tokenizer.model'), 'wb') as f:
      f.write(model.getvalue())
    config.update(tokenizer_class='LlamaTokenizer', add_bos_token=True)
  else:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120,
                                             special_tokens=['<unk>', '<s>', '</s>', '<pad>'])
    tok.train_from_iterator([TEXT] * 20, trainer)
    if how == 'post_processor':
      tok.post_processor = tokenizers.processors.TemplateProcessing(
          single='<s> $A', special_tokens=[('<s>', 1)])
    tok.save(os.path.join(folder, 'tokenizer.json'))
  if how == 'post_processor' and not chat:
    config['add_bos_token'] = False
  if chat == 'tokenizer_config.json':
    config['chat_template'] = CHAT_TEMPLATE
  elif chat:   # transformers 5 saves templates this way
    with open(os.path.join(folder, chat), 'w') as f:
      f.write(CHAT_TEMPLATE)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)


def make_hf_model(family, seed=0):
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra))
  with torch.no_grad():  # random biases and norm scales too, so every mapping is exercised
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name else 0.15 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """{family: (transformers model, saved folder)}; llama is saved in shards with an index."""
  out = {}
  for family in FAMILIES:
    folder = str(tmp_path_factory.mktemp(f'hf_{family}'))
    model = make_hf_model(family)
    model.save_pretrained(folder, max_shard_size='40KB' if family == 'llama' else '1GB')
    write_tokenizer(folder, *TOKENIZERS[family])
    out[family] = (model, folder)
  assert os.path.isfile(os.path.join(out['llama'][1], 'model.safetensors.index.json'))
  return out


@pytest.fixture(scope='module')
def imported(hf, tmp_path_factory):
  """{family: workdir} imported from the saved folders."""
  out = {}
  for family, (_, folder) in hf.items():
    out[family] = str(tmp_path_factory.mktemp(f'wd_{family}') / 'run')
    import_hf(folder, out[family])
  return out


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(workdir, tokens, overrides=None):
  loaded = load_workdir(workdir)
  graphdef = loaded.graphdef
  if overrides:  # the same parameters under a different model function
    graphdef = loop.setup(schema.apply_overrides(loaded.config, overrides)).graphdef
  return np.asarray(nnx.merge(graphdef, loaded.params)(jnp.asarray(tokens)))


def hf_greedy(model, prompt, new_tokens):
  """transformers' greedy `generate`, never stopping early (our samplers run to the end)."""
  gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, eos_token_id=None,
                                      pad_token_id=COMMON['pad_token_id'])
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    return model.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape),
                          generation_config=gen).numpy()


RANDOM_TOKENS = np.random.RandomState(0).randint(4, 128, (2, 48))   # 48 > WINDOW


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


PROMPT = 'the quick brown fox'


def reference_tokenizer(folder):
  """transformers' tokenizer for a folder: its generic tokenizers backend on tokenizer.json (the
  Qwen2 class would rebuild a byte-level pipeline that our small test tokenizer does not have),
  else AutoTokenizer (a sentencepiece tokenizer.model, converted by transformers)."""
  if os.path.isfile(os.path.join(folder, 'tokenizer.json')):
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


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
    from interop.hf_params import TensorSpec
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
