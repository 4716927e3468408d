"""Our cached decoding vs transformers' `generate` on the same imported tiny Llama (CPU).

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/hf_compare.py

A random Llama is built with transformers, saved, imported with `interop.convert.import_hf`, and
both sides generate greedily from the same prompts. Timings are medians of interleaved repeats
(ours, theirs, ours, ...), so machine noise hits both alike. Prefill = generating 1 token;
decode time per token = (time for N new tokens - time for 1) / (N - 1).
Prints: decode tokens/s of both and their ratio (target >= 1.5x), the prefill time ratio, and
whether the greedy tokens agree.
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from interop.convert import import_hf  # noqa: E402
from workdir.load import load_workdir  # noqa: E402

from sampling.sampler import Sampler  # noqa: E402

def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--kv_heads', type=int, default=2)
  p.add_argument('--vocab', type=int, default=1024)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--prompt_len', type=int, default=128)
  p.add_argument('--new_tokens', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--chunk', type=int, default=64, help='our decode steps per jitted call')
  return p.parse_args()


def build_llama(args, folder):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=3 * args.d_model,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=2048, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(folder)
  model.generation_config.eos_token_id = None
  return model


def theirs(model, prompts, new):
  gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None,
                                      pad_token_id=0)
  with torch.inference_mode():
    out = model.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape),
                         generation_config=gen)
  return out[:, prompts.shape[1]:].numpy()


def make_ours(workdir, chunk):
  """Our cached sampler on the imported workdir: (prompts, n) -> [B, n] greedy new tokens."""
  loaded = load_workdir(workdir)
  sampler = Sampler(loaded.graphdef, loaded.params, max_len=loaded.config.model.max_len,
                    chunk=chunk)

  def run(prompts, new):
    return np.stack(sampler.generate(list(prompts), max_new_tokens=new, temperature=0.0))
  return run, f'cached sampler (sampling/sampler.py, decode chunks of {chunk})'


def median_times(fns, repeats):
  """Interleaved timing: {name: median seconds}."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  args = parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    folder, workdir = os.path.join(tmp, 'hf'), os.path.join(tmp, 'wd')
    model = build_llama(args, folder)
    import_hf(folder, workdir)
    ours, label = make_ours(workdir, args.chunk)
    prompts = np.random.RandomState(0).randint(3, args.vocab, (args.batch, args.prompt_len))
    n = args.new_tokens
    same = np.array_equal(ours(prompts, n), theirs(model, prompts, n))   # also compiles ours
    ours(prompts, 1), theirs(model, prompts, 1)  # warm-up
    t = median_times({'ours_1': lambda: ours(prompts, 1),
                      'theirs_1': lambda: theirs(model, prompts, 1),
                      'ours_n': lambda: ours(prompts, n),
                      'theirs_n': lambda: theirs(model, prompts, n)}, args.repeats)
  ours_tps = args.batch * (n - 1) / (t['ours_n'] - t['ours_1'])
  theirs_tps = args.batch * (n - 1) / (t['theirs_n'] - t['theirs_1'])
  params = sum(p.numel() for p in model.parameters())
  print(f'hf_compare: random Llama {args.layers} layers, d_model={args.d_model}, '
        f'{args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab} '
        f'({params / 1e6:.1f}M params), fp32 CPU, batch {args.batch}, prompt {args.prompt_len}, '
        f'{n} new tokens, median of {args.repeats} interleaved repeats')
  print(f'hf_compare: ours = {label}; torch threads {torch.get_num_threads()}')
  print(f'decode tokens/s: ours {ours_tps:.0f}, transformers generate {theirs_tps:.0f}, '
        f'ratio {ours_tps / theirs_tps:.2f}x (target >= 1.5x)')
  print(f'decode ms/token: ours {1e3 * args.batch / ours_tps:.2f}, '
        f'transformers {1e3 * args.batch / theirs_tps:.2f}')
  print(f'prefill ({args.prompt_len} tokens x {args.batch}, + first token) ms: ours '
        f'{1e3 * t["ours_1"]:.1f}, transformers {1e3 * t["theirs_1"]:.1f}, ratio ours/transformers '
        f'{t["ours_1"] / t["theirs_1"]:.2f} (< 1 = ours faster)')
  print(f'greedy tokens identical: {same}')


if __name__ == '__main__':
  main()
