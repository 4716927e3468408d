"""GPT-2 small (124M): 12 layers, d=768, 12 heads, GELU MLP, LayerNorm, learned positions, tied
embeddings, biases; bf16 compute with fp32 parameters, layers under lax.scan.

Variants: `124m` (default) and `smoke` (the same recipe at toy size, for a CPU check).
Tokens: point `data.tokenizer` at GPT-2's tokenizer.json (vocab 50257, padded here to 50304 for
faster matmuls) and `data.files` at the text; the byte tokenizer fits in the vocabulary too.
Throughput on a GPU: see docs/scale.md.
"""
from configs.base import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.model.update(num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, mlp_dim=3072,
                 mlp_activation='gelu', norm='layernorm', norm_eps=1e-5, positional='learned',
                 max_len=1024, vocab_size=50304, attention_bias=True, mlp_bias=True,
                 dtype='bfloat16', scan_layers=True, remat='none')
  c.data.seq_len = 1024
  # 512 x 1024 = 0.5M tokens a step (GPT-2/3 small), 10B tokens in 19073 steps (as nanoGPT).
  c.train.update(steps=19_073, batch_size=512, grad_accum_steps=8, learning_rate=6e-4,
                 warmup_steps=715, weight_decay=0.1, b2=0.95, log_every=10, eval_every=500,
                 checkpoint_every=1000)
  arg = arg or '124m'
  if arg == 'smoke':
    c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=256,
                   max_len=128, vocab_size=384)
    c.data.seq_len = 128
    c.train.update(steps=20, batch_size=8, grad_accum_steps=1, warmup_steps=5, eval_every=10,
                   eval_batches=2, checkpoint_every=10)
  elif arg != '124m':
    raise ValueError(f'configs/gpt2.py: unknown variant {arg!r}; choose 124m or smoke.')
  return c
