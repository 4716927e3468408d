"""Hugging Face checkpoints in and out.

  python -m interop.hf --from_hf=HF_DIR --workdir=DIR   # Llama, Mistral, Qwen2, Gemma (2) -> workdir
  python -m interop.hf --workdir=DIR --to_hf=OUT        # workdir -> transformers folder
  python -m interop.hf --workdir=DIR --to_peft=OUT      # a LoRA workdir's adapters -> PEFT folder
  python -m interop.hf --workdir=DIR --to_hf=OUT --merge_lora   # ... merged into the weights

The imported workdir samples (`sample.py --workdir=DIR`) and fine-tunes
(`train.py --config=configs/finetune.py:DIR --workdir=DIR`).
"""
from workdir import hostenv

hostenv.ensure_fast_malloc()

from absl import app, flags, logging  # noqa: E402

from interop.convert import export_hf, import_hf  # noqa: E402
from interop.hf_config import InteropError  # noqa: E402
from interop.peft import export_peft  # noqa: E402
from workdir.files import WorkdirError  # noqa: E402

_FROM_HF = flags.DEFINE_string('from_hf', None, 'A Hugging Face folder (config.json, '
                               'safetensors, tokenizer.json) to import into --workdir.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Export --workdir to this new folder.')
_TO_PEFT = flags.DEFINE_string('to_peft', None, 'Export the LoRA adapters of --workdir to this '
                               'new folder, as a PEFT adapter (adapter_config.json, '
                               'adapter_model.safetensors).')
_MERGE_LORA = flags.DEFINE_bool('merge_lora', False, '--to_hf of a LoRA workdir: merge the '
                                'adapters into the exported weights.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir to create (import) or read (export).',
                               required=True)
_DTYPE = flags.DEFINE_string('dtype', None, 'Import: compute dtype (default float32). Export: '
                             'tensor dtype (default: the workdir\'s model.param_dtype).')
_PARAM_DTYPE = flags.DEFINE_string('param_dtype', 'float32', 'Import: parameter dtype.')
_MAX_SHARD = flags.DEFINE_string('max_shard_size', '5GB', 'Export: largest safetensors shard.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if sum(f.value is not None for f in (_FROM_HF, _TO_HF, _TO_PEFT)) != 1:
    raise SystemExit('error: give exactly one of --from_hf=HF_DIR (import), --to_hf=OUT (export) '
                     'or --to_peft=OUT (export LoRA adapters).')
  if _MERGE_LORA.value and _TO_HF.value is None:
    raise SystemExit('error: --merge_lora goes with --to_hf=OUT.')
  try:
    if _FROM_HF.value is not None:
      config = import_hf(_FROM_HF.value, _WORKDIR.value, dtype=_DTYPE.value or 'float32',
                         param_dtype=_PARAM_DTYPE.value)
      m = config.model
      print(f'Imported {_FROM_HF.value} into {_WORKDIR.value}: {m.num_layers} layers, '
            f'd_model={m.d_model}, vocab {m.vocab_size}, tokenizer {config.data.tokenizer}.')
    elif _TO_PEFT.value is not None:
      peft = export_peft(_WORKDIR.value, _TO_PEFT.value, dtype=_DTYPE.value)
      print(f'Exported the LoRA adapters of {_WORKDIR.value} to {_TO_PEFT.value} (r={peft["r"]}, '
            f'lora_alpha={peft["lora_alpha"]}, {", ".join(peft["target_modules"])}).')
    else:
      hf = export_hf(_WORKDIR.value, _TO_HF.value, dtype=_DTYPE.value,
                     max_shard_size=_MAX_SHARD.value, merge_lora=_MERGE_LORA.value)
      merged = ' with the LoRA adapters merged' if _MERGE_LORA.value else ''
      print(f'Exported {_WORKDIR.value} to {_TO_HF.value} as {hf["architectures"][0]}{merged}.')
  except (InteropError, WorkdirError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
