"""Fine-tune the model a workdir holds (e.g. one made by `python -m interop.hf --from_hf=...`).

  python train.py --config=configs/finetune.py:DIR --workdir=DIR [--config.train.steps=...]

The variant is the workdir: its saved config.json, so the model fields match its checkpoint;
training resumes from its latest checkpoint. Override data and train fields as usual.
"""
from workdir import files


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError('configs/finetune.py needs the workdir as its variant: '
                     '--config=configs/finetune.py:DIR.')
  return files.load_config(arg)
