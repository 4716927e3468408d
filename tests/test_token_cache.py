"""The token cache: input formats against an independent reader, bad records, the cache's name,
interrupted builds (an exception in-process; kill -9 of a child) and the readers.

Reference: each file read with json / gzip / pyarrow directly and tokenized document by
document, split with the documented hash rule.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import default, schema
from tests.conftest import ROOT, run_cli
from training import token_cache
from training.documents import DataError
from training.token_stream import Cache, TokenStream
from text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def data_cfg(tmp_path, files, **kw):
  overrides = {'data.corpus': 'files', 'data.files': files, 'data.eval_percent': 30.0,
               'data.cache_dir': str(tmp_path / 'cache'), 'data.prepare_workers': 1,
               **{f'data.{k}': v for k, v in kw.items()}}
  return schema.apply_overrides(default.get_config('tiny'), overrides).data


def texts(n, seed, words=('alpha', 'beta', 'gamma', 'δέλτα', 'tab\there', '"quoted"')):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def make_corpus(tmp_path, field='text'):
  """Four formats; returns [(split key, text, (file index, line/row))] in file order, the
  files sorted by name as the cache sorts them."""
  d = tmp_path / 'in'
  d.mkdir()
  a, b, c = texts(40, 0), texts(30, 1), texts(50, 2)
  with open(d / 'a.jsonl', 'w') as f:
    for i, t in enumerate(a):
      f.write(json.dumps({field: t, 'id': i}) + ('\n\n' if i == 5 else '\n'))  # an empty line
  with gzip.open(d / 'b.jsonl.gz', 'wt') as f:
    f.writelines(json.dumps({field: t}) + '\n' for t in b)
  pq.write_table(pa.table({field: c, 'n': list(range(50))}), d / 'c.parquet', row_group_size=7)
  (d / 'd.txt').write_text('one whole document\nof two lines\n')
  docs = [(t, t, (0, i + 1 + (i > 5))) for i, t in enumerate(a)]
  docs += [(t, t, (1, i + 1)) for i, t in enumerate(b)]
  docs += [(t, t, (2, i)) for i, t in enumerate(c)]
  docs += [(str(d / 'd.txt'), (d / 'd.txt').read_text(), (3, 0))]
  return str(d / '*'), docs


def expected_stream(docs, split, eval_percent=30.0):
  chosen = [t for key, t, _ in docs if token_cache.is_held_out(key, eval_percent) == (split == 'eval')]
  return np.concatenate([np.append(TOK.encode(t), TOK.eos_id) for t in chosen]), chosen


@pytest.fixture
def small_units(monkeypatch):
  """Units of ~300 bytes: every file is cut into several pieces, over several shards."""
  monkeypatch.setattr(token_cache, 'unit_bytes_for', lambda total: 300)


def test_formats_match_a_reference_reader(tmp_path, small_units):
  files, docs = make_corpus(tmp_path, field='body')
  cfg = data_cfg(tmp_path, files, text_field='body')
  cache = Cache(token_cache.ensure(cfg, progress=False))
  assert len(cache.manifest['shards']) > 10
  for split in ('train', 'eval'):
    stream, chosen = expected_stream(docs, split)
    assert 5 < len(chosen) < 120
    np.testing.assert_array_equal(cache.stream(split)[:], stream)
    documents = cache.documents(split)
    assert len(documents) == len(chosen)
    for i, t in enumerate(chosen):
      np.testing.assert_array_equal(documents[i], TOK.encode(t))
    where = [w for key, _, w in docs
             if token_cache.is_held_out(key, 30.0) == (split == 'eval')]
    assert [documents.where(i) for i in range(len(documents))] == where
  assert cache.totals['docs'] == {'train': len(expected_stream(docs, 'train')[1]),
                                  'eval': len(expected_stream(docs, 'eval')[1])}
  counts = np.bincount(expected_stream(docs, 'eval')[0])
  np.testing.assert_array_equal(cache.eval_unigram_counts(), counts)


def tree_bytes(root):
  out = {}
  for folder, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(folder, n), 'rb') as f:
        out[os.path.relpath(os.path.join(folder, n), root)] = f.read()
  return out


def test_worker_count_does_not_change_the_cache(tmp_path, small_units):
  files, _ = make_corpus(tmp_path)
  one = token_cache.ensure(data_cfg(tmp_path, files), progress=False)
  two = token_cache.ensure(data_cfg(tmp_path, files, prepare_workers=2,
                                    cache_dir=str(tmp_path / 'two')), progress=False)
  assert os.path.basename(one) == os.path.basename(two)
  assert tree_bytes(one) == tree_bytes(two)


def test_interrupted_build_continues_to_the_same_bytes(tmp_path, small_units, monkeypatch):
  files, _ = make_corpus(tmp_path)
  whole = tree_bytes(token_cache.ensure(data_cfg(tmp_path, files, cache_dir=str(tmp_path / 'w')),
                                        progress=False))
  build = token_cache.build_unit
  cfg = data_cfg(tmp_path, files)
  for stop_after in (3, 9):
    calls = []

    def failing(unit_id, pieces):
      calls.append(unit_id)
      if len(calls) > stop_after:
        raise KeyboardInterrupt
      return build(unit_id, pieces)

    monkeypatch.setattr(token_cache, 'build_unit', failing)
    with pytest.raises(KeyboardInterrupt):
      token_cache.ensure(cfg, progress=False)
    # the units already built are not built again
    assert calls[0] == (0 if stop_after == 3 else 3)
  monkeypatch.setattr(token_cache, 'build_unit', build)
  assert tree_bytes(token_cache.ensure(cfg, progress=False)) == whole


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='writer start times come from /proc')
def test_stale_temporaries_are_those_of_gone_writers(tmp_path):
  """A killed build's temporaries are deleted on the rerun: its writer exited, is a zombie
  (killed, not yet reaped) or its PID now belongs to a later process; a running writer's and
  another host's are kept. Reference: the writer processes' states as this test made them."""
  host = token_cache._HOST
  me = os.getpid()
  zombie = subprocess.Popen(['true'])
  for _ in range(500):   # until it has exited (unreaped: a zombie)
    if token_cache._process_start(zombie.pid) is None:
      break
    time.sleep(0.01)
  exited = subprocess.Popen(['true'])
  exited.wait()
  names = {'live': f'a.tmp-{host}-{me}-{token_cache._process_start(me)}',
           'reused': f'b.tmp-{host}-{me}-1',   # this PID, but a writer that started earlier
           'zombie': f'c.tmp-{host}-{zombie.pid}-1',
           'exited': f'd.tmp-{host}-{exited.pid}-1',
           'other host': f'e.tmp-{host}x-{exited.pid}-1', 'not a temporary': 'f.json'}
  for name in names.values():
    (tmp_path / name).write_bytes(b'')
  token_cache._remove_stale_temporaries(str(tmp_path))
  zombie.wait()
  assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ('live', 'other host',
                                                                  'not a temporary'))


def test_cache_name_follows_content_not_training_settings(tmp_path):
  files, _ = make_corpus(tmp_path)
  cfg = data_cfg(tmp_path, files)
  path = token_cache.cache_path(cfg)
  assert token_cache.cache_path(data_cfg(tmp_path, files, seq_len=32, prepare_workers=2)) == path
  for changed in (dict(text_field='body'), dict(eval_percent=10.0),
                  dict(skip_bad_records=True)):
    assert token_cache.cache_path(data_cfg(tmp_path, files, **changed)) != path
  os.utime(tmp_path / 'in' / 'd.txt', ns=(0, 10**9))   # same size, another mtime
  assert token_cache.cache_path(cfg) != path


BAD = [  # (file, content, the error, the documents kept when skipping)
    ('x.jsonl', '{"text": "a"}\n{"text": "b"}\n{"text": \n', r'x.jsonl:3: not valid JSON', 'ab'),
    ('x.jsonl', '{"text": "a"}\n{"body": "b"}\n', r"x.jsonl:2: no field 'text' \(data.text_field\)",
     'a'),
    ('x.jsonl', '{"text": "a"}\n\n{"text": 7}\n', r"x.jsonl:3: field 'text' is int, not a string",
     'a'),
    ('x.jsonl', '["text"]\n{"text": "b"}\n', r'x.jsonl:1: expected a JSON object, found list', 'b'),
    ('x.parquet', {'text': ['a', None, 'c']}, r"x.parquet: row 1: column 'text' is null", 'ac'),
]


def write_input(tmp_path, name, content):
  path = tmp_path / name
  if name.endswith('.parquet'):
    pq.write_table(pa.table(content), path)
  else:
    path.write_text(content)
  return str(path)


@pytest.mark.parametrize('name,content,message,kept', BAD)
def test_bad_records_are_named_or_skipped_and_counted(tmp_path, capsys, name, content, message,
                                                      kept):
  files = write_input(tmp_path, name, content)
  with pytest.raises(DataError, match='data.files: .*' + message + '.*data.skip_bad_records'):
    token_cache.ensure(data_cfg(tmp_path, files), progress=False)
  cache = Cache(token_cache.ensure(data_cfg(tmp_path, files, skip_bad_records=True),
                                   progress=False))
  assert cache.totals['bad_records'] == 1
  assert 'skipped 1 bad record(s)' in capsys.readouterr().err
  docs = [cache.documents(split) for split in ('train', 'eval')]
  assert sorted(TOK.decode(d[i]) for d in docs for i in range(len(d))) == list(kept)


def test_unusable_inputs_and_cache_dir_are_clear_errors(tmp_path, monkeypatch):
  (tmp_path / 'a.txt').write_text('hello ' * 100)
  (tmp_path / 'b.jsonl.gz').write_bytes(b'not gzip at all')
  with pytest.raises(DataError, match=r'data.files: cannot read .*b.jsonl.gz'):
    token_cache.ensure(data_cfg(tmp_path, str(tmp_path / 'b.jsonl.gz')), progress=False)
  (tmp_path / 'c.parquet').write_bytes(b'PAR1 but not parquet')
  with pytest.raises(DataError, match=r'data.files: .*c.parquet is not a readable parquet file'):
    token_cache.ensure(data_cfg(tmp_path, str(tmp_path / 'c.parquet')), progress=False)
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(DataError, match=r"data.cache_dir='.*file/sub': cannot write the token "
                                      'cache'):
    token_cache.ensure(data_cfg(tmp_path, str(tmp_path / 'a.txt'),
                                cache_dir=str(blocker / 'sub')), progress=False)
  real_open = open

  def denied(path, *args, **kw):
    if str(path).endswith('a.txt'):
      raise PermissionError(13, 'Permission denied', str(path))
    return real_open(path, *args, **kw)

  monkeypatch.setattr('builtins.open', denied)
  with pytest.raises(DataError, match=r'data.files: cannot read .*a.txt \(Permission denied\)'):
    token_cache.ensure(data_cfg(tmp_path, str(tmp_path / 'a.txt')), progress=False)
  assert blocker.read_text() == '' and (tmp_path / 'a.txt').read_text() == 'hello ' * 100


def test_token_stream_slices_like_the_concatenation(tmp_path):
  rng = np.random.default_rng(0)
  arrays = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (5, 0, 17, 1, 40)]
  parts = []
  for i, a in enumerate(arrays):
    (tmp_path / f'{i}.bin').write_bytes(np.concatenate([np.zeros(3, np.uint16), a]).tobytes())
    parts.append((str(tmp_path / f'{i}.bin'), 'uint16', 3, a.size))
  stream, whole = TokenStream(tuple(parts)), np.concatenate(arrays).astype(np.int32)
  assert stream.size == whole.size == 63
  for _ in range(200):
    a, b = sorted(rng.integers(-5, 70, size=2))
    np.testing.assert_array_equal(stream[a:b], whole[a:b])
    np.testing.assert_array_equal(stream.sub(max(a, 0), b)[:], whole[max(a, 0):b])
  assert stream[-1] == whole[-1] and stream[20] == whole[20]
  np.testing.assert_array_equal(stream.bincount(chunk=7), np.bincount(whole))
  np.testing.assert_array_equal((stream.sub(0, 10) + stream.sub(30, 63))[:],
                                np.concatenate([whole[:10], whole[30:]]))


# ------------------------------------------------------------------------------ kill -9

CHILD = textwrap.dedent('''
    import sys
    from configs import default, schema
    from training import token_cache
    token_cache.unit_bytes_for = lambda total: 10_000
    cfg = schema.apply_overrides(default.get_config('tiny'), {
        'data.corpus': 'files', 'data.files': sys.argv[1], 'data.tokenizer': sys.argv[2],
        'data.cache_dir': sys.argv[3], 'data.prepare_workers': 2}).data
    print(token_cache.ensure(cfg, progress=False))
''')


def kill_group_but_resource_tracker(child):
  """SIGKILL to `child` (a session leader), then to every process of its group except
  multiprocessing's resource tracker. The tracker outlives the others and unlinks the pool's
  named semaphores, which killing it too would leave in /dev/shm on every run. Without /proc
  (not Linux) the whole group is killed, tracker included."""
  if not os.path.isdir('/proc/self'):
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    return
  os.kill(child.pid, signal.SIGKILL)   # first: a dead pool respawns no workers
  child.wait()
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      if os.getpgid(int(pid)) != child.pid:
        continue
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if b'resource_tracker' not in f.read():
          os.kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, FileNotFoundError):
      pass   # exited meanwhile


def bpe_tokenizer(path, text_files):
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=['<unk>', '</s>'])
  tok.train(text_files, trainer)
  tok.save(str(path))
  return str(path)


@pytest.mark.slow
def test_kill_9_during_prepare_then_rerun_is_byte_identical(tmp_path):
  """A child that only prepares (2 worker processes, a BPE tokenizer, ~100 shards) is killed
  with SIGKILL, with its workers, at several moments; reruns continue, and the finished cache
  equals an uninterrupted build byte for byte."""
  src = tmp_path / 'in'
  src.mkdir()
  for k in range(4):
    with open(src / f'{k}.jsonl', 'w') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in texts(1500, k))
  tok = bpe_tokenizer(tmp_path / 'tokenizer.json', [str(src / '0.jsonl')])
  files = str(src / '*.jsonl')
  env = dict(os.environ, PYTHONPATH=ROOT)

  def run(cache_dir):
    return subprocess.Popen([sys.executable, '-c', CHILD, files, tok, cache_dir], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)

  reference = run(str(tmp_path / 'ref'))
  out, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err.decode()
  ref_path = out.decode().strip().splitlines()[-1]
  shards = len(json.load(open(os.path.join(ref_path, 'manifest.json')))['shards'])
  assert shards > 50
  cache = tmp_path / 'killed'
  path = cache / os.path.basename(ref_path)
  done = lambda: len([n for n in os.listdir(path / 'shards') if n.endswith('.json')]) \
      if (path / 'shards').is_dir() else 0
  for target in (0, 5, shards // 2):
    child, start = run(str(cache)), time.time()
    while done() < target and child.poll() is None and time.time() - start < 120:
      time.sleep(0.005)
    if target == 0:
      time.sleep(0.3)
    kill_group_but_resource_tracker(child)
    assert not (path / 'manifest.json').exists(), 'the build finished before the kill'
  final = run(str(cache))
  out, err = final.communicate(timeout=300)
  assert final.returncode == 0, err.decode()
  assert out.decode().strip().splitlines()[-1] == str(path)
  assert 'shards already done' in err.decode()
  assert tree_bytes(path) == tree_bytes(ref_path)


def test_prepare_cli_prints_the_cache_path_and_clear_errors(tmp_path):
  (tmp_path / 'a.jsonl').write_text('\n'.join(json.dumps({'text': t}) for t in texts(50, 3)))
  args = ['prepare.py', '--config=configs/default.py:tiny', '--config.data.corpus=files',
          f'--config.data.files={tmp_path}/a.jsonl', '--config.data.prepare_workers=1']
  done = run_cli(*args, f'--config.data.cache_dir={tmp_path}/cache', timeout=120)
  assert done.returncode == 0, done.stderr
  path = done.stdout.strip().splitlines()[-1]
  cfg = data_cfg(tmp_path, f'{tmp_path}/a.jsonl', eval_percent=2.0)
  assert path == token_cache.cache_path(cfg) and Cache(path).totals['docs']['train'] > 40
  (tmp_path / 'file').write_text('')
  failed = run_cli(*args, f'--config.data.cache_dir={tmp_path}/file/cache', timeout=120)
  assert failed.returncode == 1
  assert failed.stderr.strip().splitlines()[-1].startswith(
      f"error: data.cache_dir='{tmp_path}/file/cache': cannot write the token cache")


def test_documents_carry_the_tokenizers_special_tokens(tmp_path):
  """LM documents are encoded as transformers encodes them: a tokenizer.json whose
  post-processor adds BOS gives BOS + text (+ the EOS separator); a sentencepiece model whose
  tokenizer_config.json asks for BOS and EOS gives BOS + text + EOS, without a second EOS."""
  import io  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  spm = pytest.importorskip('sentencepiece')
  docs = texts(12, 0)
  (tmp_path / 'in.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in docs))
  (tmp_path / 'bpe').mkdir()
  path = bpe_tokenizer(tmp_path / 'bpe' / 'tokenizer.json', [str(tmp_path / 'in.jsonl')])
  ref = tokenizers.Tokenizer.from_file(path)
  ref.add_special_tokens(['<s>'])
  ref.post_processor = tokenizers.processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', ref.token_to_id('<s>'))])
  ref.save(path)
  eos = ref.token_to_id('</s>')
  (tmp_path / 'sp').mkdir()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model, vocab_size=24,
                                 minloglevel=2)
  (tmp_path / 'sp' / 'tokenizer.model').write_bytes(model.getvalue())
  (tmp_path / 'sp' / 'tokenizer_config.json').write_text(json.dumps(
      {'add_bos_token': True, 'add_eos_token': True}))
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'sp' / 'tokenizer.model'))
  cases = ((path, lambda t: ref.encode(t).ids + [eos]),
           (str(tmp_path / 'sp' / 'tokenizer.model'),
            lambda t: [sp.bos_id()] + sp.encode(t) + [sp.eos_id()]))
  for i, (tok, expected) in enumerate(cases):
    cfg = data_cfg(tmp_path, str(tmp_path / 'in.jsonl'), tokenizer=tok,
                   cache_dir=str(tmp_path / f'cache{i}'))
    cache = Cache(token_cache.ensure(cfg, progress=False))
    chosen = [t for t in docs if not token_cache.is_held_out(t, 30.0)]
    np.testing.assert_array_equal(cache.stream('train')[:],
                                  np.concatenate([expected(t) for t in chosen]))
