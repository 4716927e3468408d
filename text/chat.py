"""Prompts as a model expects them: plain text with the tokenizer's special tokens, or a chat
turn rendered through the tokenizer's `chat_template` (jinja2, set up as transformers'
`apply_chat_template` sets it up: sandboxed, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text)."""
from __future__ import annotations

import datetime
import json

import numpy as np


def render_chat(template: str, messages: list[dict], special_tokens: dict,
                add_generation_prompt: bool = True) -> str:
  """The template rendered with `messages` ([{'role': 'user', 'content': ...}]) and the
  tokenizer's special token strings (bos_token, eos_token, ...) as transformers passes them."""
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  return env.from_string(template).render(messages=messages,
                                          add_generation_prompt=add_generation_prompt,
                                          **special_tokens)


def prompt_ids(tok, prompt: str, chat: bool = False) -> tuple[str, np.ndarray]:
  """(the text the model continues, its ids). Plain: `prompt` with the special tokens the
  tokenizer adds (e.g. BOS). chat: one user turn rendered by the chat template, then encoded
  without adding special tokens (the template writes them), as transformers does."""
  if not chat:
    return prompt, tok.encode(prompt, add_special_tokens=True)
  if tok.chat_template is None:
    raise ValueError(f'--chat: the tokenizer {tok.name} has no chat template (no `chat_template` '
                     'in its tokenizer_config.json, no chat_template.jinja beside it).')
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    text = render_chat(tok.chat_template, [{'role': 'user', 'content': prompt}],
                       tok.special_token_strings)
  except jinja2.TemplateError as e:
    raise ValueError(f'--chat: the chat_template of {tok.name} failed to render: {e}') from None
  return text, tok.encode(text, add_special_tokens=False)
