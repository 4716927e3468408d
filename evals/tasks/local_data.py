"""The shipped tasks' data loader (lm-eval `custom_dataset`): JSON-lines files beside this file.

lm-eval hands `dataset_kwargs` over; `data_files` ({split: file name}) are resolved against this
folder, so the tasks work from any working directory and offline.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_files: dict, **_):
  """{split: file name} -> a datasets.DatasetDict read by the `json` builder."""
  import datasets  # pylint: disable=import-outside-toplevel
  files = {split: os.path.join(HERE, name) for split, name in data_files.items()}
  return datasets.load_dataset('json', data_files=files)
