"""Process set-up that must happen before JAX starts.

XLA:CPU allocates its large temporary buffers afresh on every step. With glibc's default 4 KiB
pages each train step of the default model page-faulted ~400 MB; backing malloc with transparent
huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) made the step 1.7x faster on 2 cores.
The tunable is read only at process start, so the CLIs re-execute themselves once with it.

XLA:CPU flags (`XLA_CPU_FLAGS`, added to XLA_FLAGS unless the user already sets that flag): jax
0.10's default hands dots, elementwise work and reductions to YNNPACK fusions; the default train
step ran 1.28x slower that way than with XLA's own fusion emitters (the YNNPACK list emptied),
measured single-threaded in interleaved pairs on a loaded 2-core machine
(benchmarks/train_vs_torch.py). Reductions alone stay with YNNPACK: XLA's own emitters rewrite a
row reduction longer than 32 (the softmax max and sum of attention) into a reduce-window and a
reduce, and that reduce-window took ~9 of the ~50 ms of the default model's attention forward +
backward (one core); with YNNPACK reductions the train step ran 0.96x torch's speed instead of
0.92x (two runs of 7 pairs each, 2-core AVX-512 Xeon). The flags change which kernels run, not
what is computed (tests/test_hostenv.py checks loss and gradients both ways).

With jax's JAX_DISABLE_MOST_OPTIMIZATIONS set (compile cheaply, run slowly: the test suite sets
it), `CHEAP_COMPILE_XLA_CPU_FLAGS` are added too: XLA's elemental emitters instead of its fusion
emitters halve the CPU time of compiling a train step at -O0 (tiny model 1.8 -> 0.9 CPU-s, the
README's tiny Llama 3.6 -> 1.75); the compiled step runs slower (the default model's, optimised,
~14%: 0.72x torch instead of 0.84x in benchmarks/train_vs_torch.py), which few-step tests
never notice.

Training (`ensure_fast_malloc('train')`) adds `TRAINING_TUNABLES` and runs JAX's CPU
computations inline instead of on its dispatch threads. XLA:CPU allocates a step's temporaries as
one block (559 MiB for the default model's step in benchmarks/train_vs_torch.py) and frees it
after the step. glibc serves a block that large with mmap: always in the arenas of non-main
threads (XLA's dispatch threads), and in the main thread's arena above `mmap_threshold` (at most
32 MiB), so every step the kernel mapped and zeroed those pages again (~600 faults and ~90 ms of
the ~1 s of CPU time per step; `clear_page` led the perf profile). Allocated by the main thread
with `mmap_max=0` and trimming off, the block stays in the heap and is reused: ~0 faults, and
7.4K -> 8.6K tokens/s in benchmarks/train_vs_torch.py, 14.1K -> 16.4K for the default config's
train.py on 2 cores. The cost is memory: the heap keeps what it once held (freed blocks are
reused, never returned to the OS), and the default config's train.py (200 steps and its final
evaluation) peaked at 1.40 GB RSS instead of 0.95 GB, 1.27 GB of it held through training
(a malloc_trim after the first step, returning what compiling freed, made that 1.44 GB).

Sampling adds `SAMPLING_XLA_CPU_FLAGS`: XLA:CPU computes bf16 dots in f32 from an f32 copy of each
weight, and its default concurrency-optimised scheduler starts all those converts first, so a bf16
model's prefill held an f32 copy of every weight at once (478 MiB of temporaries for a 150M Llama);
the memory-minimising scheduler converts each weight just before its dot (96 MiB, the largest
weight). jax 0.10 ignores this option in `jax.jit(compiler_options=...)`, hence the flag. The
decode loop itself is compiled with YNNPACK dots and reductions
(`sampling.sampler.DECODE_COMPILER_OPTIONS`, an option jax does pass on).
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys

TUNABLES = ('glibc.malloc.hugetlb=1',)
# Sampling: allocations of 1 MiB or more (restored parameters, XLA's buffers) are mmapped and
# unmapped when freed; glibc's default threshold grows to 32 MiB as blocks are freed, leaving
# freed parameter-sized blocks in the heap. At most 2 malloc arenas: each compiler and restore
# thread otherwise grows its own arena, whose freed pages stay resident (150M Llama on an idle
# 2-core machine: sample.py's peak 1.50x -> 1.47x of fp32 parameters, 1.94x -> 1.78x of bf16).
SAMPLING_TUNABLES = (*TUNABLES, 'glibc.malloc.mmap_threshold=1048576',
                     'glibc.malloc.arena_max=2')
# Training: no mmapped chunks and no heap trimming, so each step's temporaries reuse the same
# (already faulted) heap pages; see the module docstring.
TRAINING_TUNABLES = (*TUNABLES, 'glibc.malloc.mmap_max=0', f'glibc.malloc.trim_threshold={2**40}')
XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',)
# Sampling keeps XLA's own reductions: its speed and memory figures were measured with them.
SAMPLING_XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',
                          '--xla_cpu_enable_concurrency_optimized_scheduler=false')
CHEAP_COMPILE_XLA_CPU_FLAGS = ('--xla_cpu_use_fusion_emitters=false',)


def configure_xla_cpu(flags: tuple[str, ...] = XLA_CPU_FLAGS) -> None:
  """Adds `flags` to XLA_FLAGS (those the user has not set), and CHEAP_COMPILE_XLA_CPU_FLAGS
  when JAX_DISABLE_MOST_OPTIMIZATIONS is set. Effective only before JAX initialises its
  backends; the flags only concern the CPU backend."""
  if os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS', '').lower() in ('1', 'true', 'yes', 'on',
                                                                       't', 'y'):
    flags = (*flags, *CHEAP_COMPILE_XLA_CPU_FLAGS)
  current = os.environ.get('XLA_FLAGS', '')
  missing = [f for f in flags if f.split('=')[0] not in current]
  if missing:
    os.environ['XLA_FLAGS'] = ' '.join([current, *missing]).strip()


# workload -> (malloc tunables, XLA:CPU flags); see `ensure_fast_malloc`.
WORKLOADS = {'default': (TUNABLES, XLA_CPU_FLAGS), 'train': (TRAINING_TUNABLES, XLA_CPU_FLAGS),
             'sample': (SAMPLING_TUNABLES, SAMPLING_XLA_CPU_FLAGS)}


def ensure_fast_malloc(workload: str = 'default') -> None:
  """Re-executes this process with the malloc tunables of `workload` set (Linux/glibc only; a
  no-op elsewhere), and adds its XLA:CPU flags (`configure_xla_cpu`, inherited by the re-exec).

  workload: a key of `WORKLOADS`: 'default', 'train' (train.py and the training benchmarks;
    also makes JAX's CPU dispatch synchronous) or 'sample' (sample.py).
  Must run before JAX initialises its backends. Set LMX_NO_REEXEC=1 to opt out of the re-exec.
  """
  if workload not in WORKLOADS:
    raise ValueError(f'ensure_fast_malloc: workload {workload!r} is not one of '
                     f'{", ".join(WORKLOADS)}')
  tunables, flags = WORKLOADS[workload]
  configure_xla_cpu(flags)
  current = os.environ.get('GLIBC_TUNABLES', '')
  missing = [t for t in tunables if t.split('=')[0] not in current]
  if has_glibc_malloc() and missing and not os.environ.get('LMX_NO_REEXEC'):
    env = dict(os.environ, GLIBC_TUNABLES=':'.join(t for t in (current, *missing) if t))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  if workload == 'train':
    import jax   # the main thread then allocates each step's temporaries (module docstring)
    jax.config.update('jax_cpu_enable_async_dispatch', False)


def release_free_memory() -> None:
  """Returns the heap pages malloc holds free to the OS (glibc's malloc_trim; a no-op
  elsewhere): after restoring or compiling, glibc keeps freed pages between live blocks.
  Collects Python's garbage first: a restore leaves reading buffers in reference cycles (150M
  bf16 Llama: 25-45 MiB more released)."""
  gc.collect()
  if has_glibc_malloc():
    ctypes.CDLL(None).malloc_trim(0)


def has_glibc_malloc() -> bool:
  """Whether this process runs on Linux with glibc, whose malloc the tunables configure."""
  return sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'
