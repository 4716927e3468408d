"""Document packing: the packer's row properties, and packed rows run by both model kinds equal
each document (or pair) run alone, with the xla and the blockwise attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import encdec, schema
from models import build_model
from training import loop, packing

EOS, PAD, BOS = 0, 999, 998


def unique_docs(lengths):
  """Document i's token j is 1 + 100 * i + j: every token names its document and offset."""
  return [1 + 100 * i + np.arange(n) for i, n in enumerate(lengths)]


def doc_and_offset(inputs, targets):
  """(document, offset in [EOS] + doc + [EOS]) of a piece, read off its first pair."""
  first = inputs[0] if inputs[0] != EOS else targets[0]
  return (first - 1) // 100, (0 if inputs[0] == EOS else (inputs[0] - 1) % 100 + 1)


@pytest.mark.parametrize('num_bins', [1, 3, 16])
def test_every_pair_once_padding_weightless_positions_restart(num_bins):
  t = 16
  lengths = [5, 1, 40, 14, 15, 16, 31, 2, 0, 9]
  docs = unique_docs(lengths)
  rows = list(packing.pack_documents(docs, t, eos_id=EOS, pad_id=PAD, num_bins=num_bins))
  seqs = [np.concatenate([[EOS], d, [EOS]]) for d in docs]
  covered = [np.zeros(len(s) - 1, int) for s in seqs]
  for row in rows:
    seg, pos, w = row['segment_ids'], row['positions'], row['weights']
    assert all(row[k].shape == (t,) for k in row) and set(row) == set(packing._LM_KEYS)
    pad = seg == 0
    assert np.all(w[pad] == 0) and np.all(w[~pad] == 1)
    assert np.all(row['inputs'][pad] == PAD) and np.all(row['targets'][pad] == PAD)
    ids = seg[~pad]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(np.unique(ids)) == 1)
    assert not pad[:(~pad).sum()].any()          # segments first, padding after
    for s in np.unique(ids):
      at = seg == s
      inputs, targets = row['inputs'][at], row['targets'][at]
      np.testing.assert_array_equal(pos[at], np.arange(at.sum()))   # positions restart
      d, off = doc_and_offset(inputs, targets)
      assert lengths[d]
      # inputs and targets are consecutive pairs of one document: a document's last token
      # predicts its own EOS (weight 1), never the next document's first token.
      np.testing.assert_array_equal(inputs, seqs[d][off:off + at.sum()])
      np.testing.assert_array_equal(targets, seqs[d][off + 1:off + 1 + at.sum()])
      covered[d][off:off + at.sum()] += 1
  # Every token and every closing EOS is a target once; an empty document gives no pair.
  assert all(np.all(c == (1 if n else 0)) for c, n in zip(covered, lengths))
  assert len(rows) >= -(-sum(n + 1 for n in lengths if n) // t)


def test_deterministic_and_resumable():
  docs = unique_docs(np.random.default_rng(0).integers(0, 50, size=60))
  make = lambda: iter(packing.pack_documents(docs, 24, eos_id=EOS, pad_id=PAD, num_bins=4)
                      .batch(3, drop_remainder=True))
  want = list(make())
  it = make()
  head = [next(it) for _ in range(5)]
  state = it.get_state()
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(want, head + list(resumed), strict=True):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pairs_share_segment_ids_across_sides():
  rng = np.random.default_rng(1)
  pairs = [(rng.integers(1, 90, size=rng.integers(0, 7)), rng.integers(1, 90, size=rng.integers(0, 5)))
           for _ in range(30)]
  rows = list(packing.pack_pairs(pairs, 12, 9, bos_id=BOS, eos_id=EOS, pad_id=PAD, num_bins=2))
  seen = []
  for row in rows:
    assert row['sources'].shape == (12,) and row['inputs'].shape == (9,)
    assert set(np.unique(row['source_segment_ids'])) - {0} == set(np.unique(row['segment_ids'])) - {0}
    assert np.all(row['weights'] == (row['segment_ids'] > 0))
    for s in set(np.unique(row['segment_ids'])) - {0}:
      src, at = row['source_segment_ids'] == s, row['segment_ids'] == s
      np.testing.assert_array_equal(row['source_positions'][src], np.arange(src.sum()))
      np.testing.assert_array_equal(row['positions'][at], np.arange(at.sum()))
      source, target = row['sources'][src], row['targets'][at]
      assert source[-1] == EOS and target[-1] == EOS and row['inputs'][at][0] == BOS
      np.testing.assert_array_equal(row['inputs'][at][1:], target[:-1])
      seen.append((tuple(source[:-1]), tuple(target[:-1])))
  assert sorted(seen) == sorted((tuple(s), tuple(t)) for s, t in pairs)
  with pytest.raises(ValueError, match='does not fit source_len=12'):
    list(packing.pack_pairs([(np.arange(12), np.arange(2))], 12, 9, bos_id=BOS, eos_id=EOS,
                            pad_id=PAD))


def test_fixed_batches_pad_with_weightless_rows():
  rows = list(packing.pack_documents(unique_docs([30, 3, 7]), 8, eos_id=EOS, pad_id=PAD))
  batches = packing.fixed_batches(rows, 4)
  assert sum(b['weights'].sum() for b in batches) == 30 + 3 + 7 + 3
  assert all(b['inputs'].shape == (4, 8) for b in batches)
  assert batches[-1]['weights'][len(rows) % 4:].sum() == 0


def test_train_stream_shuffles_pieces_shards_them_and_eval_set_is_fixed():
  docs = unique_docs(np.random.default_rng(2).integers(1, 60, size=80))
  kw = dict(eos_id=EOS, pad_id=PAD, num_bins=4)
  source = packing.PieceSource(docs, 16, EOS)
  pieces = [p for d in docs for p in packing.document_pieces(d, 16, EOS)]
  assert len(source) == len(pieces) and all(
      np.array_equal(source[i][k], p[k]) for i, p in enumerate(pieces) for k in p)
  seen = []
  for pi in range(2):
    it = iter(packing.packed_train_dataset(docs, 16, 8, 0, process_index=pi, process_count=2,
                                           **kw))
    batches = [next(it) for _ in range(6)]
    assert all(b['inputs'].shape == (4, 16) for b in batches)
    rows = [(b['inputs'][r], b['targets'][r], b['segment_ids'][r]) for b in batches
            for r in range(4)]
    seen.append({doc_and_offset(x[s == i], y[s == i]) for x, y, s in rows
                 for i in set(np.unique(s)) - {0}})
  assert seen[0] and seen[1] and not seen[0] & seen[1]     # processes read disjoint pieces
  first_docs = [d for d, _ in sorted(seen[0])]
  assert len(set(first_docs)) > len(first_docs) * 0.6      # pieces of many documents, shuffled
  evals = packing.packed_eval_batches(docs, 16, 4, 3, **kw)
  again = packing.packed_eval_batches(docs, 16, 4, 3, **kw)
  assert len(evals) == 3 and all(np.array_equal(a[k], b[k]) for a, b in zip(evals, again)
                                 for k in a)
  all_rows = list(packing.pack_documents(docs, 16, **kw))
  assert len(all_rows) > 12 and not any(np.array_equal(evals[0]['inputs'][1], r['inputs'])
                                        for r in all_rows[:2])   # spread, not the first rows


def test_padded_examples_pack_like_pairs():
  from training import seq2seq_data
  from text.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  rng = np.random.default_rng(4)
  pairs = [(rng.integers(0, 256, size=rng.integers(0, 6)), rng.integers(0, 256, size=rng.integers(0, 6)))
           for _ in range(12)]
  examples = [seq2seq_data.make_example(s, t, 8, 7, tok) for s, t in pairs]
  got = list(packing.pack_examples(examples, 8, 7, pad_id=tok.pad_id, num_bins=3))
  want = list(packing.pack_pairs(pairs, 8, 7, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, num_bins=3))
  assert len(got) == len(want) and all(np.array_equal(a[k], b[k]) for a, b in zip(got, want)
                                       for k in a)


# ------------------------------------------------------------------------- models

def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def _segments(batch, key='segment_ids'):
  """[(row, boolean [T] of one segment)] of a packed batch."""
  return [(r, batch[key][r] == s) for r in range(len(batch[key]))
          for s in sorted(set(np.unique(batch[key][r])) - {0})]


def _alone(tokens_list, length, pad):
  """Each token array at the start of its own row, padded to `length` (no packing arguments:
  causal decoders and the encoder's pad mask make the padding invisible)."""
  return jnp.asarray(np.stack([np.pad(t, (0, length - t.size), constant_values=pad)
                               for t in tokens_list]))


def _run(model, fn, *args):
  """fn(model, *args) compiled once (the tests' shapes are tiny: compilation dominates)."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
  return jitted.lower(state, *args).compile(
      compiler_options={'xla_backend_optimization_level': 0})(state, *args)


@pytest.mark.parametrize('impl,positional', [('xla', 'rope'), ('blockwise', 'rope'),
                                             ('blockwise', 'learned'), ('xla', 'sinusoidal')])
def test_packed_decoder_row_equals_each_document_alone(tiny_config, impl, positional):
  cfg = tiny_config({'model.attention': impl, 'model.positional': positional,
                     'model.attention_block_q': 8, 'model.attention_block_kv': 8})
  model = build_model(cfg, nnx.Rngs(0))
  docs = [np.asarray(jax.random.randint(jax.random.key(i), (n,), 1, 256))
          for i, n in enumerate([11, 3, 9, 20, 6])]
  rows = list(packing.pack_documents(docs, 24, eos_id=EOS, pad_id=PAD - 900, num_bins=2))
  batch = packing.fixed_batches(rows, len(rows))[0]
  segs = _segments(batch)
  assert len(segs) > len(rows)            # rows hold several documents
  alone_in = _alone([batch['inputs'][r][at] for r, at in segs], 24, PAD - 900)
  packed, alone, (loss_sum, weight_sum) = _run(
      model, lambda m, b, a: (m(b['inputs'], b['positions'], b['segment_ids']), m(a),
                              loop.model_loss(m, b)),
      {k: jnp.asarray(v) for k, v in batch.items()}, alone_in)
  want_loss = 0.0
  for i, (r, at) in enumerate(segs):
    _close(packed[r][at], alone[i][:at.sum()])
    logp = jax.nn.log_softmax(np.asarray(alone[i][:at.sum()], np.float64))
    want_loss -= np.take_along_axis(logp, batch['targets'][r][at][:, None], 1).sum()
  # The train step's loss reads the packing keys: the sum over every document run alone.
  assert sum(at.sum() for _, at in segs) == sum(d.size + 1 for d in docs) == float(weight_sum)
  np.testing.assert_allclose(float(loss_sum), want_loss, rtol=1e-5)


@pytest.mark.parametrize('impl', ['xla', 'blockwise'])
def test_packed_encoder_decoder_row_equals_each_pair_alone(impl):
  cfg = schema.validate(schema.apply_overrides(encdec.get_config('reversal,tiny'), {
      'model.attention': impl, 'model.attention_block_q': 4, 'model.attention_block_kv': 4}))
  model = build_model(cfg, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  pad = cfg.model.pad_id
  pairs = [(rng.integers(3, 200, size=n), rng.integers(3, 200, size=m))
           for n, m in [(4, 2), (2, 5), (7, 3), (1, 1)]]
  rows = list(packing.pack_pairs(pairs, 16, 12, bos_id=1, eos_id=2, pad_id=pad, num_bins=2))
  batch = packing.fixed_batches(rows, len(rows))[0]
  segs = _segments(batch)
  assert len(segs) == len(pairs) > len(rows)
  src = [batch['sources'][r][batch['source_segment_ids'][r] == batch['segment_ids'][r][at][0]]
         for r, at in segs]
  alone_args = (_alone(src, 16, pad), _alone([batch['inputs'][r][at] for r, at in segs], 12, pad))
  keys = ('sources', 'inputs', *loop.PACKING_KEYS)

  def fn(m, *args):
    b = dict(zip(keys, args))
    packed = m(b['sources'], b['inputs'], **{k: b[k] for k in loop.PACKING_KEYS})
    return packed, m(*args[len(keys):])

  packed, alone = _run(model, fn, *(jnp.asarray(batch[k]) for k in keys), *alone_args)
  for i, (r, at) in enumerate(segs):
    _close(packed[r][at], alone[i][:at.sum()])
