"""Tokenizers: the default byte-level one, a Hugging Face `tokenizer.json` (the `tokenizers`
library) and a sentencepiece `tokenizer.model` (the `sentencepiece` library).

Special tokens follow transformers (5.x): `encode(text, add_special_tokens=True)` adds what the
tokenizer adds around a text: for a tokenizer.json its post-processor (e.g. Llama 3's, Mistral's
and Gemma's BOS; transformers then ignores tokenizer_config.json's add_bos_token /
add_eos_token), for a sentencepiece model the BOS / EOS that tokenizer_config.json's
add_bos_token / add_eos_token ask for (unset: none). Prompts and training documents are encoded
with special tokens; decode drops them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Protocol

import numpy as np

TOKENIZER_CONFIG = 'tokenizer_config.json'
CHAT_TEMPLATE_FILE = 'chat_template.jinja'   # where transformers >= 4.43 also saves the template


class Tokenizer(Protocol):
  name: str             # 'byte' or the tokenizer.json / tokenizer.model path
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  chat_template: str | None          # jinja2 source (tokenizer_config.json), None without one
  special_token_strings: dict        # {'bos_token': '<s>', ...} for chat templates

  def encode(self, text: str | bytes, add_special_tokens: bool = False) -> np.ndarray: ...
  def encode_batch(self, texts: list, add_special_tokens: bool = False) -> list[np.ndarray]: ...
  def decode(self, ids) -> str: ...


def _text(t: str | bytes) -> str:
  return t.decode('utf-8', errors='replace') if isinstance(t, bytes) else t


class ByteTokenizer:
  """ids 0..255 are bytes; then <pad>, <bos>, <eos>, and sentinel ids for span corruption.
  It adds no special tokens around a text (documents are separated by EOS in the data)."""

  vocab_size = 384
  pad_id, bos_id, eos_id = 256, 257, 258
  first_sentinel = 259
  num_sentinels = vocab_size - first_sentinel
  name = 'byte'
  chat_template = None
  special_token_strings = {'pad_token': '<pad>', 'bos_token': '<bos>', 'eos_token': '<eos>'}

  def encode(self, text: str | bytes, add_special_tokens: bool = False) -> np.ndarray:
    del add_special_tokens
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_batch(self, texts: list, add_special_tokens: bool = False) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Bytes -> text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode('utf-8', errors='replace')

  def sentinel(self, i: int) -> int:
    return self.first_sentinel + i


class HFTokenizer:
  """A `tokenizers` tokenizer.json (e.g. carried over from a Hugging Face checkpoint)."""

  def __init__(self, path: str, settings: dict | None = None):
    import tokenizers  # pylint: disable=import-outside-toplevel
    settings = settings or {}
    self.name = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(name, fallbacks):
      for t in ([settings[name]] if settings.get(name) else []) + fallbacks:
        i = self._tok.token_to_id(t)
        if i is not None:
          return i
      return -1

    self.bos_id = token_id('bos_token', ['<s>', '<|begin_of_text|>', '<bos>'])
    self.eos_id = token_id('eos_token', ['</s>', '<|end_of_text|>', '<|endoftext|>', '<eos>'])
    self.pad_id = token_id('pad_token', ['<pad>'])
    if self.pad_id < 0:
      self.pad_id = max(self.eos_id, 0)
    self.chat_template = settings.get('chat_template')
    self.special_token_strings = _token_strings(settings, self._tok.id_to_token,
                                                self.bos_id, self.eos_id, self.pad_id)

  def encode(self, text: str | bytes, add_special_tokens: bool = False) -> np.ndarray:
    return np.asarray(self._tok.encode(_text(text), add_special_tokens=add_special_tokens).ids,
                      np.int32)

  def encode_batch(self, texts: list, add_special_tokens: bool = False) -> list[np.ndarray]:
    """Many texts at once (the tokenizers library's batch path: no offsets, threads unless
    TOKENIZERS_PARALLELISM=false)."""
    encode = getattr(self._tok, 'encode_batch_fast', self._tok.encode_batch)
    return [np.asarray(e.ids, np.int32)
            for e in encode([_text(t) for t in texts], add_special_tokens=add_special_tokens)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)


def _token_strings(settings: dict, id_to_token, bos_id: int, eos_id: int, pad_id: int) -> dict:
  out = {}
  for name, i in (('bos_token', bos_id), ('eos_token', eos_id), ('pad_token', pad_id),
                  ('unk_token', -1)):
    value = settings.get(name) or (id_to_token(i) if i >= 0 else None)
    if value:
      out[name] = value
  return out


class SentencePieceTokenizer:
  """A sentencepiece `tokenizer.model` (Llama 2, Mistral v0.1, Gemma), through the
  `sentencepiece` library. BOS / EOS are added around a text as tokenizer_config.json's
  add_bos_token / add_eos_token say (absent: none, as transformers 5 does). Special-token
  strings in a text (a chat template's '<s>') become their ids, and the text right after one
  gets no dummy-prefix space, as in transformers' converted tokenizer."""

  def __init__(self, path: str, settings: dict | None = None):
    import sentencepiece  # pylint: disable=import-outside-toplevel
    settings = settings or {}
    self.name = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()

    def token_id(name, default):
      piece = settings.get(name)
      if piece:
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) == piece:
          return i
      return default

    self.bos_id = token_id('bos_token', self._sp.bos_id())
    self.eos_id = token_id('eos_token', self._sp.eos_id())
    self.pad_id = token_id('pad_token', self._sp.pad_id())
    if self.pad_id < 0:
      self.pad_id = max(self.eos_id, 0)
    self.add_bos = bool(settings.get('add_bos_token')) and self.bos_id >= 0
    self.add_eos = bool(settings.get('add_eos_token')) and self.eos_id >= 0
    self.chat_template = settings.get('chat_template')
    self.special_token_strings = _token_strings(settings, self._sp.id_to_piece, self.bos_id,
                                                self.eos_id, self.pad_id)
    self._special_ids = {}
    for piece in self.special_token_strings.values():
      i = self._sp.piece_to_id(piece)
      if self._sp.id_to_piece(i) == piece and not self._sp.is_unused(i):
        self._special_ids[piece] = i
    self._split = (re.compile('(' + '|'.join(map(re.escape, sorted(self._special_ids, key=len,
                                                                    reverse=True))) + ')')
                   if self._special_ids else None)
    self._sp_no_prefix = None

  def _no_prefix(self):
    """The same model for text that follows a special token: no dummy-prefix space, and
    spaces kept as written (what transformers' converted tokenizer does there)."""
    if self._sp_no_prefix is None:
      import sentencepiece  # pylint: disable=import-outside-toplevel
      from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
      proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
      proto.normalizer_spec.add_dummy_prefix = False
      proto.normalizer_spec.remove_extra_whitespaces = False
      self._sp_no_prefix = sentencepiece.SentencePieceProcessor(
          model_proto=proto.SerializeToString())
    return self._sp_no_prefix

  def _encode_text(self, text: str) -> list[int]:
    parts = self._split.split(text) if self._split else [text]
    if len(parts) == 1:
      return self._sp.encode(text)
    ids = []
    for k, part in enumerate(parts):   # odd k: a special token; even k: text between them
      if k % 2:
        ids.append(self._special_ids[part])
      elif part:
        ids += (self._sp if k == 0 else self._no_prefix()).encode(part)
    return ids

  def encode(self, text: str | bytes, add_special_tokens: bool = False) -> np.ndarray:
    return self.encode_batch([text], add_special_tokens)[0]

  def encode_batch(self, texts: list, add_special_tokens: bool = False) -> list[np.ndarray]:
    specials = add_special_tokens
    return [np.asarray(([self.bos_id] if specials and self.add_bos else [])
                       + self._encode_text(_text(t))
                       + ([self.eos_id] if specials and self.add_eos else []), np.int32)
            for t in texts]

  def decode(self, ids) -> str:
    special = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in special])


def tokenizer_settings(path: str) -> dict:
  """What `tokenizer_config.json` beside a tokenizer file says: bos/eos/pad/unk token strings
  (strings or {'content': ...} dicts there), add_bos_token / add_eos_token when set, and the
  chat template (its `chat_template`, or a `chat_template.jinja` file)."""
  folder = os.path.dirname(path)
  config_path = os.path.join(folder, TOKENIZER_CONFIG)
  config = {}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  out = {}
  for name in ('bos_token', 'eos_token', 'pad_token', 'unk_token'):
    value = config.get(name)
    value = value.get('content') if isinstance(value, dict) else value
    if isinstance(value, str):
      out[name] = value
  for name in ('add_bos_token', 'add_eos_token'):
    if isinstance(config.get(name), bool):
      out[name] = config[name]
  template = config.get('chat_template')
  if isinstance(template, list):   # named templates: transformers uses 'default'
    template = {t.get('name'): t.get('template') for t in template}.get('default')
  jinja_path = os.path.join(folder, CHAT_TEMPLATE_FILE)
  if template is None and os.path.isfile(jinja_path):
    with open(jinja_path) as f:
      template = f.read()
  if isinstance(template, str):
    out['chat_template'] = template
  return out


def make_tokenizer(spec: str) -> Tokenizer:
  """`data.tokenizer`: 'byte', a path to a tokenizer.json, or to a sentencepiece .model file."""
  if spec == 'byte':
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file (use 'byte', a path to a "
                            'tokenizer.json or a sentencepiece tokenizer.model).')
  if spec.endswith('.model'):
    return SentencePieceTokenizer(spec, tokenizer_settings(spec))
  return HFTokenizer(spec, tokenizer_settings(spec))
