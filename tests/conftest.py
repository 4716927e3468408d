"""Shared test set-up: the repository root on sys.path, small deterministic configs."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('LMX_NO_REEXEC', '1')  # subprocess CLIs inherit the test's environment

import pytest  # noqa: E402

from configs import default, schema  # noqa: E402


@pytest.fixture
def tiny_config():
  """The tiny decoder config, with overrides: tiny_config({'model.num_kv_heads': 1})."""
  return lambda overrides=None: schema.apply_overrides(default.get_config('tiny'), overrides or {})
