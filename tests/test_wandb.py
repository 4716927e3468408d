"""Weights & Biases logging (train.wandb_project), offline: the run file holds the same metrics as
metrics.jsonl and the resolved config. Read back with a reader of the .wandb record log written
here (W&B's LevelDB-style log of protobuf records), not through the logger."""
import glob
import json
import struct
import sys

import pytest

from configs import schema
from training import loop
from training.metrics import check_wandb, read_metrics, wandb_run_id


def wandb_records(path: str) -> list:
  """The protobuf Records of a .wandb file: 7-byte header, then 32 KiB blocks of chunks
  (crc32 4, length 2, type 1: 1 full, 2 first, 3 middle, 4 last)."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  pos, block, pending, records = 7, 32768, b'', []
  while pos + 7 <= len(data):
    left = block - pos % block
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
    if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = pb.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b''
  return records


def key(item) -> str:
  return item.key or '/'.join(item.nested_key)


def test_offline_wandb_run_carries_the_metrics_and_resolved_config(tiny_config, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = tiny_config({'train.steps': 4, 'train.warmup_steps': 1, 'train.log_every': 1,
                        'train.eval_every': 2, 'train.checkpoint_every': 4,
                        'train.wandb_project': 'lmx-test'})
  workdir = str(tmp_path / 'run')
  loop.train(config, workdir)
  [path] = glob.glob(f'{workdir}/wandb/offline-run-*/run-{wandb_run_id(workdir)}.wandb')
  records = wandb_records(path)
  history = {}
  for r in records:
    if r.WhichOneof('record_type') == 'history':
      row = {key(i): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(r.history.step.num, {}).update(
          {k: v for k, v in row.items() if not k.startswith('_')})
  expected = {}
  for line in read_metrics(workdir):
    expected.setdefault(line['step'], {}).update({k: v for k, v in line.items() if k != 'step'})
  assert history.keys() == expected.keys() == {1, 2, 3, 4}
  for step in expected:
    assert history[step] == pytest.approx(expected[step])
  [run] = [r.run for r in records if r.WhichOneof('record_type') == 'run']
  logged = {key(i): json.loads(i.value_json) for i in run.config.update if key(i) != '_wandb'}
  assert logged == json.loads(schema.to_json(config))


def test_wandb_is_off_by_default_and_named_when_missing(tiny_config, monkeypatch):
  assert tiny_config().train.wandb_project is None
  check_wandb(None)
  monkeypatch.setitem(sys.modules, 'wandb', None)  # as if not installed
  with pytest.raises(schema.ConfigError, match=r"train.wandb_project='p' needs Weights & Biases: "
                                               r"pip install '.\[wandb\]'"):
    check_wandb('p')
