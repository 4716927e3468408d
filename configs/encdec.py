"""Encoder-decoder transformer: `--config=configs/encdec.py:TASK[,ARCH][,tiny]`.

TASK: `reversal` (default; strings of up to 8 letters reversed, exact match on a held-out set),
`addition` (multi-digit sums, held out the same way), `span` (T5 span corruption over the
default corpus), `pairs` (your JSONL/TSV pairs: add `--config.data.files=...`).
ARCH: `modern` (default: pre-RMSNorm, RoPE self-attention, SwiGLU, GQA) or `paper` (Vaswani et
al.: post-LayerNorm, sinusoidal positions, ReLU MLP, multi-head attention, shared embeddings
scaled by sqrt(d_model)).
`tiny`: a few-step model for tests.
"""
from configs.base import base_config

TASKS = {'addition': 'addition', 'reversal': 'reversal', 'span': 'span_corruption',
         'pairs': 'pairs'}
ARCHS = ('modern', 'paper')


def _arch(c, arch: str) -> None:
  if arch == 'paper':
    c.model.update(norm='layernorm', norm_position='post', positional='sinusoidal',
                   mlp_activation='relu', num_kv_heads=c.model.num_heads, scale_embeddings=True,
                   tie_embeddings=True, init_std=c.model.d_model ** -0.5)
  else:
    c.model.update(norm='rmsnorm', norm_position='pre', positional='rope',
                   mlp_activation='swiglu', num_kv_heads=max(1, c.model.num_heads // 2))


def _task(c, task: str) -> None:
  c.data.task = TASKS[task]
  if task in ('addition', 'reversal'):
    n = c.data.synthetic_length
    # addition: 'a+b' + EOS -> digits of the sum + EOS; reversal: n chars + EOS both ways.
    c.data.source_len, c.data.seq_len = (2 * n + 2, n + 2) if task == 'addition' else (n + 1,
                                                                                       n + 1)
    # A small model: reversal of up to 8 letters passes 95% held-out exact match in a few
    # minutes on 2 CPU cores (README); addition needs more steps.
    c.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=64, mlp_dim=256)
    c.train.update(steps=1200 if task == 'reversal' else 6000, batch_size=64,
                   learning_rate=3e-3, warmup_steps=100, weight_decay=0.0, eval_every=200,
                   eval_batches=8, checkpoint_every=600)
  elif task == 'span':
    c.data.source_len, c.data.seq_len = 256, 64
    c.train.update(steps=2000, batch_size=16, eval_every=500, checkpoint_every=500)
  else:  # pairs
    c.data.source_len, c.data.seq_len = 256, 256
    c.train.update(steps=2000, batch_size=16, eval_every=500, checkpoint_every=500)


def get_config(arg: str | None = None):
  words = [w.strip() for w in (arg or 'reversal').split(',') if w.strip()]
  unknown = [w for w in words if w not in TASKS and w not in ARCHS and w != 'tiny']
  tasks = [w for w in words if w in TASKS]
  archs = [w for w in words if w in ARCHS]
  if unknown or len(tasks) > 1 or len(archs) > 1:
    raise ValueError(f'configs/encdec.py: bad variant {arg!r}; give TASK[,ARCH][,tiny] with TASK '
                     f'one of {", ".join(TASKS)} and ARCH one of {", ".join(ARCHS)}.')
  c = base_config()
  c.model.update(kind='encoder_decoder', num_layers=0, num_encoder_layers=3, num_decoder_layers=3,
                 d_model=128, num_heads=4, mlp_dim=384, max_len=512)
  c.data.eval_percent = 2.0
  if 'tiny' in words:
    c.data.synthetic_length = 3
  _task(c, tasks[0] if tasks else 'reversal')
  if 'tiny' in words:
    c.model.update(num_encoder_layers=1, num_decoder_layers=2, d_model=32, num_heads=4,
                   mlp_dim=64, max_len=128)
    c.train.update(steps=6, batch_size=4, warmup_steps=2, log_every=3, eval_every=3,
                   eval_batches=1, checkpoint_every=3)
    if c.data.task in ('span_corruption', 'pairs'):
      c.data.source_len, c.data.seq_len = 48, 24
  _arch(c, archs[0] if archs else 'modern')   # last: the paper's init scale follows d_model
  return c
