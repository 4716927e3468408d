"""MFU: the analytic FLOPs per token against a hand count and XLA's compiled count, the peak
table and the CPU measurement, and the `mfu` field of a run's metrics lines."""
import types

import jax
import pytest
from flax import nnx

from configs import default, schema
from models import build_model
from training import flops, loop, metrics, preflight
from tests.test_preflight import WIDER, closed_form_flops_per_token


@pytest.mark.parametrize('scan', [False, True])
def test_flops_per_token_match_hand_count_and_compiled_step(scan):
  config = schema.apply_overrides(default.get_config('tiny'),
                                  {**WIDER, 'model.scan_layers': scan, 'mesh.data': 1})
  params = nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param)
  fpt = flops.flops_per_token(config, params)
  assert fpt == pytest.approx(closed_form_flops_per_token(config), rel=0.01)  # norms: the rest
  if scan:   # XLA counts a scanned body once, not per layer: compare the unrolled step only
    return
  s = loop.setup(config, jax.devices()[:1])
  compiled = s.train_step.lower(s.abstract_state, preflight.abstract_batch(config, s.mesh)).compile()
  tokens = config.train.batch_size * config.data.seq_len
  # Elementwise work (softmax, norms, Adam) is the rest of XLA's count: a few percent.
  assert preflight._flops(compiled) / tokens == pytest.approx(fpt, rel=0.05)


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_peak_flops_table_and_cpu_measurement():
  peak, source = flops.peak_flops([_device('gpu', 'NVIDIA H100 80GB HBM3')] * 8)
  assert peak == 8 * 989e12 and 'bf16' in source
  assert flops.peak_flops([_device('tpu', 'TPU v5 lite')])[0] == 197e12
  assert flops.peak_flops([_device('tpu', 'TPU v5p')])[0] == 459e12
  cpu = jax.devices('cpu')
  peak, source = flops.peak_flops(cpu * 4)   # simulated CPU devices share the host's cores
  assert 1e8 < peak < 1e14 and 'measured' in source


def test_metrics_lines_carry_mfu(trained):
  config, workdir = trained
  lines = [m for m in metrics.read_metrics(workdir) if 'tokens_per_sec' in m]
  # (a loaded machine can under-measure the CPU peak, so mfu is not bounded by 1 here)
  assert lines and all(m['mfu'] > 0 for m in lines)
  # One FLOP count and one peak for the whole run: mfu / tokens_per_sec is the same constant.
  params = loop.setup(config, jax.devices()[:1]).abstract_state.params
  per_token = [m['mfu'] / m['tokens_per_sec'] for m in lines]
  assert max(per_token) == pytest.approx(min(per_token), rel=1e-9)
  peak = flops.flops_per_token(config, params) / per_token[0]
  assert 1e8 < peak < 1e14   # the measured CPU matmul rate this run divided by
