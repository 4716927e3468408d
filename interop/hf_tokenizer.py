"""Tokenizer files in and out of Hugging Face folders (the `tokenizers` and `sentencepiece`
libraries).

In: `tokenizer.json`, or else a sentencepiece `tokenizer.model`, is checked and copied into the
workdir with `tokenizer_config.json` (special tokens, add_bos_token / add_eos_token, the chat
template) and `chat_template.jinja` when present; `data.tokenizer` points at the copy. Out: the
workdir's files, or for our byte tokenizer an equivalent `tokenizer.json` (byte b -> id b, then
<pad>, <bos>, <eos> and the sentinels) so transformers' tokenizers give exactly our ids.
"""
from __future__ import annotations

import json
import os
import shutil

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from interop.hf_config import InteropError
from text.tokenizer import (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, ByteTokenizer, Tokenizer,
                            make_tokenizer)

TOKENIZER_JSON = 'tokenizer.json'
SENTENCEPIECE = 'tokenizer.model'
# Tokenizer files of other kinds (slow-tokenizer vocabularies) we cannot read.
UNSUPPORTED = ('vocab.json', 'merges.txt', 'vocab.txt', 'spiece.model', 'tokenizer.tiktoken')


def tokenizer_files(folder: str) -> list[str]:
  """The tokenizer files of `folder` worth carrying, checked; the first is the tokenizer
  (tokenizer.json, else tokenizer.model). [] when the folder has no tokenizer files at all."""
  for name in (TOKENIZER_JSON, SENTENCEPIECE):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      break
  else:
    others = [f for f in UNSUPPORTED if os.path.isfile(os.path.join(folder, f))]
    if others:
      raise InteropError(f'{folder}: tokenizer files {", ".join(others)} are of a type not '
                         f'supported; supported: {TOKENIZER_JSON} (tokenizers) or '
                         f'{SENTENCEPIECE} (sentencepiece).')
    return []
  files = [path]
  config_path = os.path.join(folder, TOKENIZER_CONFIG)
  if os.path.isfile(config_path):
    try:
      with open(config_path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      raise InteropError(f'{config_path}: not valid JSON ({e}).') from None
    files.append(config_path)
  if os.path.isfile(os.path.join(folder, CHAT_TEMPLATE_FILE)):
    files.append(os.path.join(folder, CHAT_TEMPLATE_FILE))
  library = 'tokenizers' if name == TOKENIZER_JSON else 'sentencepiece'
  try:
    make_tokenizer(path)
  except Exception as e:  # both libraries raise bare Exceptions / RuntimeErrors on bad files
    raise InteropError(f'{path}: the {library} library cannot load it ({e}).') from None
  return files


def vocab_size(path: str) -> int:
  return make_tokenizer(path).vocab_size


def copy_files(files: list[str], folder: str) -> None:
  for path in files:
    shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-in character for every byte: the alphabet of tokenizers'
  ByteLevel pre-tokenizer and decoder."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def byte_tokenizer_json(tok: ByteTokenizer) -> str:
  """A tokenizer.json whose ids equal `ByteTokenizer`'s: no merges, so every byte is a token."""
  vocab = {c: b for b, c in bytes_to_unicode().items()}
  specials = {tok.pad_id: '<pad>', tok.bos_id: '<bos>', tok.eos_id: '<eos>'}
  specials.update({tok.sentinel(i): f'<extra_id_{i}>' for i in range(tok.num_sentinels)})
  vocab.update({name: i for i, name in specials.items()})
  t = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  t.decoder = decoders.ByteLevel()
  t.add_special_tokens([specials[i] for i in sorted(specials)])
  return t.to_str()


def _token(t: tokenizers.Tokenizer, i: int) -> str | None:
  return t.id_to_token(i) if i >= 0 else None


def export_files(data_tokenizer: str, tok: Tokenizer, folder: str) -> None:
  """Writes the tokenizer (tokenizer.json or tokenizer.model), tokenizer_config.json and any
  chat_template.jinja for the workdir's `data.tokenizer`."""
  out = os.path.join(folder, TOKENIZER_JSON)
  if data_tokenizer == 'byte':
    with open(out, 'w') as f:
      f.write(byte_tokenizer_json(tok))
  else:
    sp = data_tokenizer.endswith('.model')
    shutil.copyfile(data_tokenizer, os.path.join(folder, SENTENCEPIECE) if sp else out)
    for name in (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG):
      carried = os.path.join(os.path.dirname(data_tokenizer), name)
      if os.path.isfile(carried):
        shutil.copyfile(carried, os.path.join(folder, name))
    if sp or os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG)):
      return
  t = tokenizers.Tokenizer.from_file(out)
  config = {'tokenizer_class': 'PreTrainedTokenizerFast',
            'bos_token': _token(t, tok.bos_id), 'eos_token': _token(t, tok.eos_id),
            'pad_token': _token(t, tok.pad_id), 'add_bos_token': False, 'add_eos_token': False,
            'clean_up_tokenization_spaces': False}
  with open(os.path.join(folder, TOKENIZER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
