"""The two sides benchmarks/train_vs_torch.py and step_breakdown.py compare, built from one shape
dict {layers, d_model, heads, kv_heads, mlp, batch, seq}: our config, and transformers'
LlamaForCausalLM with torch's AdamW (tied byte embeddings, fp32, the same optimizer settings)."""
from __future__ import annotations

import numpy as np

VOCAB = 384


def cpu_description() -> str:
  """The CPU model and its widest vector extensions (Linux /proc/cpuinfo; 'unknown CPU' elsewhere).
  The ratio depends on it: on a 2-core Xeon with AVX-512 and AMX torch's step ran 1.4x faster
  and ours 1.3x slower than on the machine of the README's 1.50x."""
  try:
    info = open('/proc/cpuinfo').read()
  except OSError:
    return 'unknown CPU'
  fields = {}   # the first processor's fields (every core repeats them)
  for line in info.splitlines():
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get('flags', '').split())
  ext = [e for e in ('avx2', 'fma', 'avx512f', 'amx_tile') if e in flags]
  return f'{fields.get("model name", "unknown CPU")} ({", ".join(ext) or "no AVX2"})'


def random_tokens(seed: int, batch: int, seq: int) -> np.ndarray:
  """[batch, seq + 1] byte tokens: inputs [:, :-1], targets [:, 1:]."""
  return np.random.default_rng(seed).integers(0, 256, (batch, seq + 1), np.int32)


def our_config(sh: dict, attention: str = 'auto'):
  """configs/default.py:small at the shape, one device, `model.attention`."""
  from configs import default, schema
  return schema.validate(schema.apply_overrides(default.get_config('small'), {
      'model.num_layers': sh['layers'], 'model.d_model': sh['d_model'],
      'model.num_heads': sh['heads'], 'model.num_kv_heads': sh['kv_heads'],
      'model.mlp_dim': sh['mlp'], 'model.max_len': sh['seq'], 'data.seq_len': sh['seq'],
      'model.attention': attention, 'train.batch_size': sh['batch'], 'train.steps': 10_000,
      'mesh.data': 1}))


def torch_model_and_optimizer(sh: dict):
  """(LlamaForCausalLM in train mode, AdamW), seeded."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=sh['d_model'], intermediate_size=sh['mlp'],
      num_hidden_layers=sh['layers'], num_attention_heads=sh['heads'],
      num_key_value_heads=sh['kv_heads'], max_position_embeddings=sh['seq'], rms_norm_eps=1e-6,
      tie_word_embeddings=True, attn_implementation='sdpa')
  model = transformers.LlamaForCausalLM(cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  return model, opt


def torch_loss(model, tokens):
  """Mean next-token cross entropy of `tokens` [B, T + 1] (a torch LongTensor)."""
  import torch
  logits = model(input_ids=tokens[:, :-1]).logits
  return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
