"""Tokenizers: the default byte-level one, and any Hugging Face `tokenizer.json` file."""
from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  name: str             # 'byte' or the tokenizer.json path
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str | bytes) -> np.ndarray: ...
  def encode_batch(self, texts: list) -> list[np.ndarray]: ...
  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """ids 0..255 are bytes; then <pad>, <bos>, <eos>, and sentinel ids for span corruption."""

  vocab_size = 384
  pad_id, bos_id, eos_id = 256, 257, 258
  first_sentinel = 259
  num_sentinels = vocab_size - first_sentinel
  name = 'byte'

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_batch(self, texts: list) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Bytes -> text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode('utf-8', errors='replace')

  def sentinel(self, i: int) -> int:
    return self.first_sentinel + i


class HFTokenizer:
  """A `tokenizers` tokenizer.json (e.g. carried over from a Hugging Face checkpoint)."""

  def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.name = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(tok, fallbacks):
      for t in ([tok] if tok else []) + fallbacks:
        i = self._tok.token_to_id(t)
        if i is not None:
          return i
      return -1

    self.bos_id = token_id(bos_token, ['<s>', '<|begin_of_text|>', '<bos>'])
    self.eos_id = token_id(eos_token, ['</s>', '<|end_of_text|>', '<|endoftext|>', '<eos>'])
    self.pad_id = token_id(pad_token, ['<pad>'])
    if self.pad_id < 0:
      self.pad_id = max(self.eos_id, 0)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list) -> list[np.ndarray]:
    """Many texts at once (the tokenizers library's batch path: no offsets, threads unless
    TOKENIZERS_PARALLELISM=false)."""
    texts = [t.decode('utf-8', errors='replace') if isinstance(t, bytes) else t for t in texts]
    encode = getattr(self._tok, 'encode_batch_fast', self._tok.encode_batch)
    return [np.asarray(e.ids, np.int32) for e in encode(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)


def special_tokens(path: str) -> dict:
  """bos/eos/pad token strings from the `tokenizer_config.json` beside a tokenizer.json, if any
  (Hugging Face keeps them there, as strings or {'content': ...} dicts)."""
  config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if not os.path.isfile(config_path):
    return {}
  with open(config_path) as f:
    config = json.load(f)
  out = {}
  for name in ('bos_token', 'eos_token', 'pad_token'):
    value = config.get(name)
    value = value.get('content') if isinstance(value, dict) else value
    if isinstance(value, str):
      out[name] = value
  return out


def make_tokenizer(spec: str) -> Tokenizer:
  """`data.tokenizer`: 'byte' or a path to a tokenizer.json file."""
  if spec == 'byte':
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file (use 'byte' or a path to a "
                            'tokenizer.json).')
  return HFTokenizer(spec, **special_tokens(spec))
