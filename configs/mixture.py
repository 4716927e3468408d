"""A weighted mixture of three standard-library packages (`data.corpus='mixture'`).

Each source is a corpus of its own (its files, token cache and held-out split); training rows
come from the sources in proportion to their weights (training/mixture.py) and metrics.jsonl
carries `eval_loss/NAME` per source beside the mixture's `eval_loss`. Weights need not sum to
1; 0 leaves a source out (`--config.data.mixture.email.weight=0.0`). Variants as
configs/default.py: tiny, small (default), medium.
"""
import os

from configs import default
from training.documents import stdlib_root


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  lib = stdlib_root()
  c.data.corpus = 'mixture'
  c.data.mixture = {
      'asyncio': {'files': os.path.join(lib, 'asyncio', '*.py'), 'weight': 0.5},
      'email': {'files': os.path.join(lib, 'email', '*.py'), 'weight': 0.3},
      'unittest': {'files': os.path.join(lib, 'unittest', '*.py'), 'weight': 0.2},
  }
  return c
