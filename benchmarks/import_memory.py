"""Peak memory of importing a Hugging Face Llama and of sampling the imported workdir.

  python benchmarks/import_memory.py [--layers=16 --d_model=768 --vocab=32000] [--keep=DIR]

Makes a ~150M-parameter Llama with bf16 safetensors locally (transformers, random init,
save_pretrained), then runs, each in a child process of its own: a bare `import jax` (the
baseline), `python -m interop.hf --from_hf` for --param_dtype float32 and bfloat16, and
`sample.py` on each result. Prints each peak RSS (of the process tree: sample.py compiles in a
child process) above the baseline as a multiple of the parameter bytes in the workdir's dtype.
Targets: import <= 2.0x, sample.py <= 1.5x.
Needs the `hf` extra (torch, transformers).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {'import': 2.0, 'sample.py': 1.5}

# Runs the command given as arguments and prints its peak RSS in KiB: the larger of ru_maxrss
# of RUSAGE_CHILDREN (the largest single process waited for, so each measurement gets a fresh
# wrapper process) and the largest sum over the command's process tree, polled every 10 ms
# (sample.py compiles in a child process while it is itself small).
_PEAK = r'''
import os, resource, subprocess, sys, time
def tree_kib(root):
  kids, rss = {}, {}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
      rss[int(pid)] = int(stat[21]) * os.sysconf('SC_PAGE_SIZE') // 1024
      kids.setdefault(int(stat[1]), []).append(int(pid))
    except (OSError, IndexError):
      pass
  todo, total = [root], 0
  while todo:
    pid = todo.pop()
    total += rss.get(pid, 0)
    todo += kids.get(pid, [])
  return total
p = subprocess.Popen(sys.argv[1:])
tree = 0
while p.poll() is None:
  tree = max(tree, tree_kib(p.pid))
  time.sleep(0.01)
peak = max(tree, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(peak if p.returncode == 0 else -abs(p.returncode))
'''


def peak_mib(cmd: list[str], env: dict) -> float:
  out = subprocess.run([sys.executable, '-c', _PEAK, *cmd], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True)
  kib = int(out.stdout.strip().splitlines()[-1])
  if kib < 0:
    raise SystemExit(f'{" ".join(cmd)} failed (exit {-kib}):\n{out.stderr[-3000:]}')
  return kib / 1024


def make_llama(folder: str, layers: int, d_model: int, vocab: int) -> int:
  """Saves a random bf16 Llama in `folder`; returns its parameter count."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=d_model, intermediate_size=int(d_model * 8 / 3) // 64 * 64,
      num_hidden_layers=layers, num_attention_heads=d_model // 64, num_key_value_heads=4,
      max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype='bfloat16')
  model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
  model.save_pretrained(folder, safe_serialization=True)
  return sum(p.numel() for p in model.parameters())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--d_model', type=int, default=768)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--keep', default=None, help='Keep the files in this folder.')
  args = parser.parse_args()
  tmp = args.keep or tempfile.mkdtemp(prefix='import_memory_')
  # hugetlb as the CLIs' re-exec sets it (workdir/hostenv.py); sample.py re-executes itself
  # once more to add its own tunables.
  env = {k: v for k, v in os.environ.items() if k not in ('LMX_NO_REEXEC', 'XLA_FLAGS')}
  env.update(JAX_PLATFORMS='cpu', TRANSFORMERS_VERBOSITY='error',
             GLIBC_TUNABLES='glibc.malloc.hugetlb=1')
  try:
    hf_dir = os.path.join(tmp, 'hf')
    n = make_llama(hf_dir, args.layers, args.d_model, args.vocab)
    file_mib = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)) / 2**20
    print(f'Llama: {n / 1e6:.1f}M parameters, {file_mib:.0f} MiB of bf16 safetensors; '
          f'{os.cpu_count()} CPUs, shared with whatever else runs on this machine now.')
    base = peak_mib([sys.executable, '-c', 'import jax, jax.numpy as jnp; jnp.zeros(1)'], env)
    print(f'baseline (python -c "import jax"): peak RSS {base:.0f} MiB')
    failed = []
    for dtype in args.dtypes.split(','):
      param_mib = n * {'float32': 4, 'bfloat16': 2}[dtype] / 2**20
      workdir = os.path.join(tmp, f'wd_{dtype}')
      shutil.rmtree(workdir, ignore_errors=True)   # left by an earlier --keep run
      runs = {
          'import': [sys.executable, '-m', 'interop.hf', f'--from_hf={hf_dir}',
                     f'--workdir={workdir}', f'--param_dtype={dtype}', f'--dtype={dtype}'],
          'sample.py': [sys.executable, 'sample.py', f'--workdir={workdir}', '--prompt=Hello',
                        '--max_new_tokens=8', '--temperature=0'],
      }
      for name, cmd in runs.items():
        above = peak_mib(cmd, env) - base
        ratio = above / param_mib
        ok = ratio <= TARGETS[name]
        failed += [] if ok else [f'{name} {dtype}']
        print(f'{name:9s} param_dtype={dtype:8s}: {above:7.0f} MiB above baseline = '
              f'{ratio:.2f}x the {param_mib:.0f} MiB of parameters (target <= '
              f'{TARGETS[name]}x: {"ok" if ok else "MISSED"})')
    print('all targets met' if not failed else f'missed: {", ".join(failed)}')
    load = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    print(f'load average (1, 5, 15 min) at the end: {load}')
  finally:
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
