"""Every config field with its default. Experiment files start from `base_config()`.

The set of keys here is the schema: `configs.schema.validate` rejects any key not present here.
"""
import os

import ml_collections
from ml_collections import config_dict

# Logical axis names used by parameter and activation annotations -> mesh axes.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(
      kind='decoder',                 # 'decoder' | 'encoder_decoder'
      vocab_size=384,                 # byte tokenizer: 256 bytes + pad/bos/eos + sentinels
      num_layers=4,                   # decoder-only depth
      num_encoder_layers=0,           # encoder-decoder only
      num_decoder_layers=0,           # encoder-decoder only
      pad_id=256,                     # encoder-decoder: source tokens with this id are padding
      d_model=256,
      num_heads=8,
      num_kv_heads=2,                 # 1 = MQA, num_heads = MHA, else GQA
      head_dim=config_dict.placeholder(int),   # None: d_model // num_heads
      mlp_dim=768,
      mlp_activation='swiglu',        # 'swiglu' | 'geglu' | 'gelu' | 'relu' (GELU: tanh approx.)
      norm='rmsnorm',                 # 'rmsnorm' | 'layernorm'
      norm_position='pre',            # 'pre' | 'post' (Vaswani) | 'sandwich' (pre + post, Gemma 2)
      norm_eps=1e-6,
      norm_scale_plus_one=False,      # norms scale by (1 + scale), scale starts at 0 (Gemma)
      positional='rope',              # 'rope' | 'sinusoidal' | 'learned'
      rope_theta=10_000.0,
      rope_scaling=dict(              # RoPE frequency rescaling for longer contexts
          kind='none',                # 'none' | 'linear' | 'llama3'
          factor=1.0,                 # 'linear' and 'llama3': frequencies / factor
          low_freq_factor=1.0,        # 'llama3' only: band edges original_max_len / these
          high_freq_factor=4.0,
          original_max_len=8192,      # 'llama3' only: the pre-training context length
      ),
      max_len=2048,                   # longest position the model (and its KV cache) supports
      sliding_window=config_dict.placeholder(int),  # None: full attention
      attention='auto',               # 'auto' | 'xla' | 'blockwise' | 'cudnn' | 'splash' | 'dense'
      attention_block_q=config_dict.placeholder(int),   # blockwise query tile (None: 256)
      attention_block_kv=config_dict.placeholder(int),  # blockwise key/value tile (None: 256)
      window_pattern='',              # per-layer 'L' (sliding_window) / 'G' (global), cycled
                                      # over layers, e.g. 'LLLG'; '' = every layer uses sliding_window
      tie_embeddings=True,
      scale_embeddings=False,         # multiply embeddings by sqrt(d_model) (Vaswani, Gemma)
      query_pre_attn_scalar=config_dict.placeholder(float),  # q.k scale 1/sqrt(this); None: head_dim
      attn_logit_softcap=config_dict.placeholder(float),     # cap * tanh(logits / cap) (Gemma 2)
      final_logit_softcap=config_dict.placeholder(float),    # the same on the output logits
      attention_bias=False,           # bias on the q/k/v projections (and o, unless set below)
      attention_out_bias=config_dict.placeholder(bool),  # None: same as attention_bias (Qwen2: False)
      mlp_bias=False,
      init_std=0.02,
      dropout=0.0,                    # training-time dropout on embeddings and sublayer outputs
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
      param_dtype='float32',
      scan_layers=False,              # stack the layers [L, ...] and run them under lax.scan
      remat='none',                   # 'none' | 'full' | 'save_dots' | 'save_dots_no_batch'
      # LoRA (models/lora.py): rank 0 = off; else only adapters on these projections train
      lora_rank=0,
      lora_alpha=16.0,                # the adapters' output is scaled by lora_alpha / lora_rank
      lora_targets='q,k,v,o,gate,up,down',   # comma-separated: q k v o (attention), gate up down
  )
  c.data = dict(
      corpus='stdlib',                # 'stdlib' (this interpreter's Lib/*.py) | 'files' | 'mixture'
      files='',                       # comma-separated paths or globs when corpus='files':
                                      # .jsonl, .jsonl.gz, .parquet, any other file = 1 document
      text_field='text',              # the text of a .jsonl record / .parquet column
      # corpus='mixture': {NAME: {'files': globs, 'weight': w >= 0, 'text_field': optional}},
      # each source its own token cache, rows drawn in proportion to the weights
      mixture={},
      skip_bad_records=False,         # True: skip (and count) bad .jsonl/.parquet records
      tokenizer='byte',               # 'byte' or a path to a tokenizer.json
      # token caches (prepare.py), one folder per content hash; $LMX_CACHE_DIR overrides the default
      cache_dir=os.environ.get('LMX_CACHE_DIR', '~/.cache/lmx/tokens'),
      prepare_workers=config_dict.placeholder(int),  # tokenizer processes; None: all cores
      seq_len=256,
      packing=False,                  # True: whole documents packed into rows, each attending
                                      # only to itself (segment ids, positions restart)
      eval_percent=2.0,               # share of files (by path hash) held out
      num_workers=0,                  # grain worker processes
      # Encoder-decoder data (training/seq2seq_data.py); the decoder-only model uses 'lm'.
      task='lm',                      # 'lm' | 'pairs' | 'span_corruption' | 'addition' | 'reversal'
      source_len=128,                 # encoder-decoder: longest source (seq_len: longest target)
      noise_density=0.15,             # span_corruption: share of tokens masked
      mean_span_length=3.0,           # span_corruption: mean masked span length (tokens)
      synthetic_length=8,             # addition: max digits per operand; reversal: max characters
  )
  c.train = dict(
      steps=360,
      batch_size=16,
      grad_accum_steps=1,
      learning_rate=3e-3,
      min_lr_ratio=0.1,               # cosine decays to learning_rate * min_lr_ratio
      warmup_steps=50,
      weight_decay=0.1,               # not applied to norms and biases
      b1=0.9,
      b2=0.95,
      grad_clip=1.0,
      seed=0,
      log_every=10,
      eval_every=120,
      eval_batches=16,
      checkpoint_every=120,
      keep_checkpoints=3,
      nonfinite='stop',               # NaN/Inf loss or gradient: the update is always skipped;
                                      # 'stop' also ends the run after max_nonfinite_steps in a
                                      # row, 'skip' keeps going (skips are counted in metrics)
      max_nonfinite_steps=10,
      wandb_project=config_dict.placeholder(str),  # Weights & Biases project; None: off
                                                     # (metrics.jsonl and TensorBoard always)
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=DEFAULT_RULES)
  return c
