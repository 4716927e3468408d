"""Config validation, overrides and JSON. All of it runs before anything is compiled.
Which fields a resumed run may change: workdir/resume.py.

Errors are `ConfigError`s whose message names the field and what is allowed.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import ml_collections

from configs.base import base_config

ENUMS = {
    'model.kind': ('decoder', 'encoder_decoder'),
    'model.mlp_activation': ('swiglu', 'geglu', 'gelu', 'relu'),
    'model.norm': ('rmsnorm', 'layernorm'),
    'model.norm_position': ('pre', 'post', 'sandwich'),
    'model.positional': ('rope', 'sinusoidal', 'learned'),
    'model.attention': ('auto', 'xla', 'blockwise', 'cudnn', 'splash', 'dense'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.remat': ('none', 'full', 'save_dots', 'save_dots_no_batch'),
    'model.rope_scaling.kind': ('none', 'linear', 'llama3'),
    'data.corpus': ('stdlib', 'files', 'mixture'),
    'data.task': ('lm', 'pairs', 'span_corruption', 'addition', 'reversal'),
    'train.nonfinite': ('skip', 'stop'),
}
SEQ2SEQ_TASKS = ('pairs', 'span_corruption', 'addition', 'reversal')
POSITIVE = (
    'model.vocab_size', 'model.d_model', 'model.num_heads', 'model.num_kv_heads',
    'model.mlp_dim', 'model.max_len', 'model.head_dim', 'model.sliding_window',
    'model.attention_block_q', 'model.attention_block_kv',
    'data.seq_len', 'train.steps', 'train.batch_size', 'train.grad_accum_steps',
    'train.log_every', 'train.eval_every', 'train.eval_batches', 'train.checkpoint_every',
    'train.keep_checkpoints', 'data.source_len', 'data.synthetic_length',
    'train.max_nonfinite_steps', 'data.prepare_workers',
)
NON_NEGATIVE = ('train.warmup_steps', 'train.learning_rate', 'train.weight_decay',
                'train.grad_clip', 'model.norm_eps', 'data.num_workers')
# LoRA (models/lora.py): the projections `model.lora_targets` may name (their attribute names in
# models/layers.py). How a resume treats the LoRA fields: workdir/resume.py.
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
GATED_ACTIVATIONS = ('swiglu', 'geglu')   # the MLPs with a `gate` projection
# LMX_MAX_STEPS=N caps train.steps and these (smoke tests of documented commands).
STEP_INTERVALS = ('log_every', 'eval_every', 'checkpoint_every', 'eval_batches')
MAX_STEPS_ENV = 'LMX_MAX_STEPS'


class ConfigError(ValueError):
  """A config field has a value that is not allowed."""


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}. Accepts ConfigDicts and plain dicts."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, path + '.'))
    else:
      out[path] = value
  return out


def known_keys() -> list[str]:
  return sorted(flatten(base_config().to_dict()))


def suggest(key: str, candidates: Iterable[str]) -> str:
  """' (did you mean `x`?)' for the closest candidate, or ''."""
  candidates = list(candidates)
  leaf = key.rsplit('.', 1)[-1]
  best = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
  if not best:  # a right leaf name under the wrong section, e.g. `train.num_kv_heads`
    by_leaf = {c.rsplit('.', 1)[-1]: c for c in candidates}
    best = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)]
  return f' (did you mean `{best[0]}`?)' if best else ''


# data.mixture maps source names (chosen by the user) to these fields; files and weight required.
MIXTURE = 'data.mixture'
MIXTURE_FIELDS = ('files', 'weight', 'text_field')
_SOURCE_NAME = re.compile(r'[A-Za-z0-9_-]+')


def _check_mixture_key(key: str, where: str) -> None:
  """`data.mixture.NAME.FIELD`: NAME letters, digits, _ or -; FIELD one of MIXTURE_FIELDS."""
  parts = key[len(MIXTURE) + 1:].split('.')
  if len(parts) == 2 and _SOURCE_NAME.fullmatch(parts[0]) and parts[1] in MIXTURE_FIELDS:
    return
  near = difflib.get_close_matches(parts[-1], MIXTURE_FIELDS, n=1, cutoff=0.6)
  hint = f' (did you mean `{MIXTURE}.{parts[0]}.{near[0]}`?)' if near and len(parts) == 2 else ''
  raise ConfigError(f'{where}: unknown key `{key}`{hint}; a mixture source has the keys '
                    f'{MIXTURE}.NAME.{{{",".join(MIXTURE_FIELDS)}}} (NAME: letters, digits, _ '
                    'or -).')


def check_keys(keys: Iterable[str], where: str = 'config') -> None:
  known = known_keys()
  for key in keys:
    if key.startswith(MIXTURE + '.'):
      _check_mixture_key(key, where)
    elif key not in known:
      raise ConfigError(f'{where}: unknown key `{key}`{suggest(key, known)}.')


def check_override_flags(argv: Iterable[str], flag: str = 'config') -> None:
  """Checks the keys of `--config.KEY=VALUE` command-line overrides against the schema, so a
  misspelt key is one error with a suggestion rather than a traceback from flag parsing."""
  for arg in argv:
    if arg.startswith(f'--{flag}.'):
      key = arg[len(flag) + 3:].split('=', 1)[0]
      check_keys([key], where=f'--{flag}.{key}')


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = 'overrides') -> ml_collections.ConfigDict:
  """Returns a copy of `config` with dotted-path `overrides` applied; unknown keys raise."""
  check_keys(overrides, where)
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    for path, value in overrides.items():
      *parents, leaf = path.split('.')
      node = config
      for p in parents:
        if p not in node:   # a data.mixture source the config lacks (check_keys allowed it)
          node[p] = ml_collections.ConfigDict()
        node = node[p]
      node[leaf] = value
  return config


def _get(config, path):
  node = config
  for p in path.split('.'):
    node = node[p]
  return node


def _check_rope_scaling(m) -> None:
  r = m.rope_scaling
  if r.kind == 'none':
    return
  if m.positional != 'rope':
    raise ConfigError(f'model.rope_scaling.kind={r.kind!r} needs model.positional=rope '
                      f'(it is {m.positional!r}).')
  if not isinstance(r.factor, (int, float)) or r.factor <= 0:
    raise ConfigError(f'model.rope_scaling.factor={r.factor!r}: must be a number > 0.')
  if r.kind == 'llama3':
    if not 0 < r.low_freq_factor < r.high_freq_factor:
      raise ConfigError(f'model.rope_scaling: need 0 < low_freq_factor < high_freq_factor; got '
                        f'{r.low_freq_factor!r} and {r.high_freq_factor!r}.')
    if not isinstance(r.original_max_len, int) or r.original_max_len <= 0:
      raise ConfigError(f'model.rope_scaling.original_max_len={r.original_max_len!r}: must be a '
                        'positive integer.')


def _check_seq2seq(m, d) -> None:
  """The encoder-decoder's data fields, and that model kind and data task agree."""
  if m.kind == 'decoder' and d.task != 'lm':
    raise ConfigError(f'data.task={d.task!r} needs model.kind=encoder_decoder; the decoder-only '
                      "model trains on data.task='lm'.")
  if m.kind == 'encoder_decoder':
    if d.task == 'lm':
      raise ConfigError("data.task='lm' is for model.kind=decoder; choose one of "
                        f'{", ".join(SEQ2SEQ_TASKS)} for model.kind=encoder_decoder.')
    if not isinstance(m.pad_id, int) or not 0 <= m.pad_id < m.vocab_size:
      raise ConfigError(f'model.pad_id={m.pad_id!r}: must be a token id in [0, '
                        f'model.vocab_size={m.vocab_size}).')
    if d.source_len > m.max_len:
      raise ConfigError(f'data.source_len={d.source_len} exceeds model.max_len={m.max_len}.')
  if d.task == 'pairs' and not d.files.strip():
    raise ConfigError("data.files is empty: give the JSONL or TSV pairs files (comma-separated "
                      "paths or globs) when data.task='pairs'.")
  if d.task in ('addition', 'reversal'):
    n = d.synthetic_length
    need = (2 * n + 2, n + 2) if d.task == 'addition' else (n + 1, n + 1)
    if d.source_len < need[0] or d.seq_len < need[1]:
      raise ConfigError(f'data.task={d.task} with data.synthetic_length={n} needs '
                        f'data.source_len >= {need[0]} and data.seq_len >= {need[1]} (EOS '
                        f'included); got {d.source_len} and {d.seq_len}.')
  if d.task == 'span_corruption':
    if not 0 < d.noise_density < 1:
      raise ConfigError(f'data.noise_density={d.noise_density!r}: must be in (0, 1).')
    if not d.mean_span_length >= 1:
      raise ConfigError(f'data.mean_span_length={d.mean_span_length!r}: must be >= 1.')


def _check_window_pattern(m) -> None:
  p = m.window_pattern
  if not isinstance(p, str) or set(p) - {'L', 'G'}:
    raise ConfigError(f"model.window_pattern={p!r}: use only 'L' (local: model.sliding_window) "
                      "and 'G' (global) per layer, cycled over layers, e.g. 'LLLG'; '' = every "
                      "layer local when model.sliding_window is set.")
  if 'L' in p and m.sliding_window is None:
    raise ConfigError(f'model.window_pattern={p!r} has local layers but model.sliding_window is '
                      'None; set model.sliding_window.')
  if m.scan_layers and set(p) == {'L', 'G'}:
    raise ConfigError(f'model.window_pattern={p!r} mixes local and global layers, but '
                      'model.scan_layers=True runs one identical layer under lax.scan; set '
                      'model.scan_layers=False (or a pattern of one kind).')


def _check_mixture(d) -> None:
  """data.corpus='mixture' and data.mixture agree; every source has files and a weight (its
  keys were checked by check_keys)."""
  sources = d.mixture
  if d.corpus != 'mixture':
    if sources:
      raise ConfigError(f'data.mixture has sources ({", ".join(sources)}) but data.corpus='
                        f"{d.corpus!r}; set data.corpus='mixture' to train on the mixture, or "
                        'leave data.mixture empty.')
    return
  if not sources:
    raise ConfigError("data.corpus='mixture' needs data.mixture: {NAME: {'files': 'globs', "
                      "'weight': w}, ...}.")
  if d.files.strip():
    raise ConfigError(f'data.files={d.files!r} is set together with data.mixture; with '
                      "data.corpus='mixture' each source names its own files "
                      '(data.mixture.NAME.files): leave data.files empty.')
  if d.task != 'lm':
    raise ConfigError(f"data.mixture trains language models (data.task='lm'); data.task is "
                      f'{d.task!r}.')
  for name, src in sources.items():
    where = f'{MIXTURE}.{name}'
    if not _SOURCE_NAME.fullmatch(name):
      raise ConfigError(f'{where}: a source name may hold only letters, digits, _ and -.')
    for key in ('files', 'weight'):
      if key not in src:
        raise ConfigError(f'{where}.{key} is missing: every source needs files (comma-separated '
                          'paths or globs) and a weight (a number >= 0).')
    if not isinstance(src.files, str) or not src.files.strip():
      raise ConfigError(f'{where}.files={src.files!r}: must be comma-separated paths or globs.')
    w = src.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      raise ConfigError(f'{where}.weight={w!r}: must be a finite number >= 0 (0 leaves the source '
                        'out).')
    if 'text_field' in src and (not isinstance(src.text_field, str) or not src.text_field.strip()):
      raise ConfigError(f'{where}.text_field={src.text_field!r}: must be a non-empty string '
                        '(leave it out to use data.text_field).')
  if not any(src.weight > 0 for src in sources.values()):
    raise ConfigError(f'data.mixture: every weight is 0 ({", ".join(sources)}); at least one '
                      'source needs a weight > 0.')


def _check_lora(m) -> None:
  rank = m.lora_rank
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise ConfigError(f'model.lora_rank={rank!r}: must be an integer >= 0 (0: no LoRA).')
  if not rank:
    return
  if not isinstance(m.lora_alpha, (int, float)) or isinstance(m.lora_alpha, bool) or \
      not m.lora_alpha > 0:
    raise ConfigError(f'model.lora_alpha={m.lora_alpha!r}: must be a number > 0 (the adapters '
                      'are scaled by lora_alpha / lora_rank).')
  allowed = [t for t in LORA_TARGETS
             if t != 'gate' or m.mlp_activation in GATED_ACTIVATIONS]
  text = m.lora_targets if isinstance(m.lora_targets, str) else ''
  names = [t.strip() for t in text.split(',') if t.strip()]
  bad = [t for t in names if t not in allowed] if names else [text]
  if bad:
    why = (f'model.mlp_activation={m.mlp_activation!r} has no gate projection'
           if bad[0] == 'gate' else 'it names no projection')
    raise ConfigError(f'model.lora_targets={m.lora_targets!r}: {bad[0]!r} is not a LoRA target '
                      f'({why}); allowed: comma-separated names from {", ".join(allowed)} '
                      '(q, k, v, o: attention; gate, up, down: MLP).')


def cap_steps(config: ml_collections.ConfigDict) -> None:
  """With LMX_MAX_STEPS=N in the environment, caps train.steps at N in place, and the log, eval
  and checkpoint intervals and eval_batches with it (warmup stays below the steps). Idempotent.
  The README test runs every documented command this way; `validate` calls it, so train.py,
  sweeps and imports all shrink alike."""
  value = os.environ.get(MAX_STEPS_ENV, '')
  if not value:
    return
  if not value.isdigit() or int(value) < 1:
    raise ConfigError(f'environment variable {MAX_STEPS_ENV}={value!r}: must be a positive '
                      'integer.')
  t = config.train
  if not all(isinstance(t[k], int) for k in ('steps', 'warmup_steps', *STEP_INTERVALS)):
    return  # validate names the bad field
  t.steps = min(t.steps, int(value))
  for key in STEP_INTERVALS:
    t[key] = min(t[key], t.steps)
  t.warmup_steps = min(t.warmup_steps, t.steps - 1)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; raises ConfigError naming the first bad field. Returns `config`
  (step counts capped first when LMX_MAX_STEPS is set: `cap_steps`)."""
  check_keys(flatten(config.to_dict()))
  cap_steps(config)
  for path, allowed in ENUMS.items():
    value = _get(config, path)
    if value not in allowed:
      raise ConfigError(f'{path}={value!r} is not allowed; choose one of {", ".join(allowed)}.')
  for path in POSITIVE:
    value = _get(config, path)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
      raise ConfigError(f'{path}={value!r}: must be a positive integer.')
  for path in NON_NEGATIVE:
    value = _get(config, path)
    if not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f'{path}={value!r}: must be a number >= 0.')
  m, d, t = config.model, config.data, config.train
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_heads={m.num_heads} must be divisible by model.num_kv_heads='
                      f'{m.num_kv_heads} (allowed num_kv_heads: '
                      f'{", ".join(str(k) for k in range(1, m.num_heads + 1) if m.num_heads % k == 0)}).')
  if m.head_dim is None and m.d_model % m.num_heads:
    raise ConfigError(f'model.d_model={m.d_model} is not divisible by model.num_heads='
                      f'{m.num_heads}; set model.head_dim explicitly.')
  if m.positional == 'rope' and (m.head_dim or m.d_model // m.num_heads) % 2:
    raise ConfigError('model.head_dim must be even for model.positional=rope.')
  if m.positional == 'sinusoidal' and m.d_model % 2:
    raise ConfigError(f'model.d_model={m.d_model} must be even for model.positional=sinusoidal.')
  _check_rope_scaling(m)
  _check_lora(m)
  if not isinstance(m.dropout, (int, float)) or not 0 <= m.dropout < 1:
    raise ConfigError(f'model.dropout={m.dropout!r}: must be a number in [0, 1).')
  _check_window_pattern(m)
  for name in ('query_pre_attn_scalar', 'attn_logit_softcap', 'final_logit_softcap'):
    value = m[name]
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not value > 0):
      raise ConfigError(f'model.{name}={value!r}: must be a number > 0, or None (off).')
  if not isinstance(m.norm_scale_plus_one, bool):
    raise ConfigError(f'model.norm_scale_plus_one={m.norm_scale_plus_one!r}: must be true or '
                      'false.')
  if m.attention_out_bias not in (None, True, False):
    raise ConfigError(f'model.attention_out_bias={m.attention_out_bias!r}: must be true, false or '
                      'None (None: the same as model.attention_bias).')
  layers = ('num_layers',) if m.kind == 'decoder' else ('num_encoder_layers', 'num_decoder_layers')
  for name in layers:
    if not isinstance(m[name], int) or m[name] <= 0:
      raise ConfigError(f'model.{name}={m[name]!r}: must be a positive integer for '
                        f'model.kind={m.kind}.')
  _check_seq2seq(m, d)
  if d.seq_len > m.max_len:
    raise ConfigError(f'data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}.')
  _check_mixture(d)
  if d.corpus == 'files' and not d.files.strip():
    raise ConfigError("data.files is empty: give comma-separated paths or globs when "
                      "data.corpus='files'.")
  for name in ('text_field', 'cache_dir'):
    if not isinstance(d[name], str) or not d[name].strip():
      raise ConfigError(f'data.{name}={d[name]!r}: must be a non-empty string.')
  if not 0 < d.eval_percent < 100:
    raise ConfigError(f'data.eval_percent={d.eval_percent}: must be in (0, 100).')
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'train.batch_size={t.batch_size} must be divisible by '
                      f'train.grad_accum_steps={t.grad_accum_steps}.')
  if not 0 <= t.min_lr_ratio <= 1:
    raise ConfigError(f'train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1].')
  for axis in ('data', 'fsdp', 'tensor'):
    size = config.mesh[axis]
    if not isinstance(size, int) or (size <= 0 and size != -1):
      raise ConfigError(f'mesh.{axis}={size!r}: must be a positive integer or -1 (the rest).')
  _check_rules(config.mesh.rules)
  return config


MESH_AXES = ('data', 'fsdp', 'tensor')


def _check_rules(rules) -> None:
  """mesh.rules: (logical name, mesh axis | tuple of mesh axes | None) pairs."""
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f'mesh.rules: {rule!r} is not a (logical name, mesh axes) pair.')
    name, axes = rule
    for ax in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      if ax is not None and ax not in MESH_AXES:
        raise ConfigError(f'mesh.rules: logical axis {name!r} maps to unknown mesh axis {ax!r}; '
                          f'mesh axes are {", ".join(MESH_AXES)}.')


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """First 12 hex digits of the sha256 of `to_json(config)`: names a resolved config (sweep trials)."""
  return hashlib.sha256(to_json(config).encode()).hexdigest()[:12]


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json`; missing keys (older workdirs) take the base defaults."""
  loaded = flatten(json.loads(text))
  if 'mesh.rules' in loaded:  # JSON turned the rule tuples into lists
    loaded['mesh.rules'] = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                                 for name, axes in loaded['mesh.rules'])
  return apply_overrides(base_config(), loaded, where='saved config')
