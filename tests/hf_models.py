"""Tiny random transformers models of each family we import, saved with their tokenizers, and
the transformers-side references the interop tests compare with (torch CPU, fp32, fixed seeds,
offline). Imported by tests/test_hf.py and tests/test_hf_cli.py.
"""
import json
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

from configs import schema  # noqa: E402
from training import loop  # noqa: E402
from workdir.load import load_workdir  # noqa: E402

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


def save_models(tmp_path_factory, families) -> dict:
  """{family: (transformers model, saved folder)}; llama is saved in shards with an index."""
  out = {}
  for family in families:
    folder = str(tmp_path_factory.mktemp(f'hf_{family}'))
    model = make_hf_model(family)
    model.save_pretrained(folder, max_shard_size='40KB' if family == 'llama' else '1GB')
    write_tokenizer(folder, *TOKENIZERS[family])
    out[family] = (model, folder)
  if 'llama' in out:
    assert os.path.isfile(os.path.join(out['llama'][1], 'model.safetensors.index.json'))
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


PROMPT = 'the quick brown fox'


def reference_tokenizer(folder):
  """transformers' tokenizer for a folder: its generic tokenizers backend on tokenizer.json (the
  Qwen2 class would rebuild a byte-level pipeline that our small test tokenizer does not have),
  else AutoTokenizer (a sentencepiece tokenizer.model, converted by transformers)."""
  if os.path.isfile(os.path.join(folder, 'tokenizer.json')):
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)
