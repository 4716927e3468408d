"""A ~1.1B-parameter Llama-style decoder for real hardware: 16 layers, d=2048, 32 query / 8 KV
heads, SwiGLU 8192, RMSNorm, RoPE (theta 500k), tied embeddings, context 2048; bf16 compute,
fp32 parameters and optimizer state, scanned layers with remat that keeps the projections.

Variants: `1b` (default) and `smoke` (the same recipe at toy size, for a CPU check).
Memory: 16 bytes/parameter of state (params, grads, Adam) = ~18 GB before activations; shard
it with `--config.mesh.fsdp=-1 --config.mesh.data=1` on several devices. MFU: docs/scale.md.
"""
from configs.base import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.model.update(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                 mlp_dim=8192, mlp_activation='swiglu', norm='rmsnorm', norm_eps=1e-5,
                 positional='rope', rope_theta=500_000.0, max_len=2048, vocab_size=50304,
                 dtype='bfloat16', scan_layers=True, remat='save_dots_no_batch')
  c.data.seq_len = 2048
  # 256 x 2048 = 0.5M tokens a step in micro-batches of 16 sequences.
  c.train.update(steps=20_000, batch_size=256, grad_accum_steps=16, learning_rate=3e-4,
                 warmup_steps=2000, weight_decay=0.1, b2=0.95, log_every=10, eval_every=1000,
                 checkpoint_every=1000)
  arg = arg or '1b'
  if arg == 'smoke':
    c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128, max_len=128, vocab_size=384)
    c.data.seq_len = 128
    c.train.update(steps=20, batch_size=8, grad_accum_steps=1, warmup_steps=5, eval_every=10,
                   eval_batches=2, checkpoint_every=10)
  elif arg != '1b':
    raise ValueError(f'configs/llm1b.py: unknown variant {arg!r}; choose 1b or smoke.')
  return c
