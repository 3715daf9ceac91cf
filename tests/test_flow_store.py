"""The teacher-flow HDF5 store of offline ALDK: round trip, resume, shape checks, re-batching."""
import h5py
import numpy as np
import pytest

from data_util.flow_store import (PARTIAL_PREFIX, FlowStore, FlowStoreError, FlowStoreWriter, pair_key,
                                  with_teacher_flows)

SHAPE = [8, 6, 4, 3]


def _flow(seed, scale=20.0):
    return (np.random.default_rng(seed).standard_normal(SHAPE) * scale).astype(np.float32)


def test_round_trip_within_float16_error(tmp_path):
    path = str(tmp_path / 'flows.h5')
    flows = {('f/a', 'f/b'): _flow(0), ('f/b', 'f/a'): _flow(1, 0.3)}
    with FlowStoreWriter(path, SHAPE, 'teacher/model-10') as w:
        for (a, b), flow in flows.items():
            w.write(a, b, flow)
    with FlowStore(path, SHAPE[:3]) as store:
        assert len(store) == 2 and store.teacher == 'teacher/model-10'
        for (a, b), flow in flows.items():
            back = store.flow(a, b)
            assert back.dtype == np.float32 and back.shape == flow.shape
            # float16: 10 mantissa bits -> relative error <= 2^-11 (plus subnormals near 0)
            assert np.all(np.abs(back - flow) <= np.abs(flow) * 2.0 ** -11 + 1e-7)
        assert not store.has('f/a', 'f/c')
        with pytest.raises(FlowStoreError, match='no flow for pair f_a-f_c'):
            store.flow('f/a', 'f/c')
    with h5py.File(path, 'r') as f:
        data = f['f_a-f_b']
        assert data.dtype == np.float16 and data.compression == 'gzip'


def test_pair_key_is_the_original_slash_free_form():
    assert pair_key('liver/12', 'youyi/0042') == 'liver_12-youyi_0042'


def test_writer_resumes_and_cleans_partial_writes(tmp_path):
    path = str(tmp_path / 'flows.h5')
    with FlowStoreWriter(path, SHAPE, 't') as w:
        w.write('a', 'b', _flow(0))
    with h5py.File(path, 'a') as f:  # what a kill between create and rename leaves behind
        f[PARTIAL_PREFIX + 'b-a'] = np.zeros(SHAPE, np.float16)
    with FlowStoreWriter(path, SHAPE, 't') as w:
        assert w.has('a', 'b') and not w.has('b', 'a') and len(w) == 1
        w.write('b', 'a', _flow(1))
        w.write('a', 'b', _flow(2))  # rewriting replaces
    with FlowStore(path) as store:
        assert len(store) == 2
        assert np.allclose(store.flow('a', 'b'), _flow(2), rtol=1e-3, atol=1e-3)


def test_shape_and_teacher_mismatches_are_refused(tmp_path):
    path = str(tmp_path / 'flows.h5')
    with FlowStoreWriter(path, SHAPE, 't') as w:
        w.write('a', 'b', _flow(0))
        with pytest.raises(FlowStoreError, match=r'has shape \[4, 4, 4, 3\]'):
            w.write('a', 'c', np.zeros([4, 4, 4, 3]))
    with pytest.raises(FlowStoreError, match=r'stored flows have shape \[8, 6, 4, 3\] but this run needs \[64, 64, 64, 3\]'):
        FlowStore(path, [64, 64, 64])
    with pytest.raises(FlowStoreError, match='stored flows have shape'):
        FlowStoreWriter(path, [4, 4, 4, 3], 't')
    with pytest.raises(FlowStoreError, match='holds flows of teacher t but this run writes flows of u'):
        FlowStoreWriter(path, SHAPE, 'u')
    other = str(tmp_path / 'other.h5')
    with h5py.File(other, 'w') as f:
        f['x'] = np.zeros(3)
    with pytest.raises(FlowStoreError, match='not a teacher flow store'):
        FlowStore(other)
    with pytest.raises(FlowStoreError, match='not a teacher flow store'):
        FlowStoreWriter(other, SHAPE, 't')
    (tmp_path / 'junk.h5').write_text('not hdf5')
    with pytest.raises(FlowStoreError, match='cannot open the flow store'):
        FlowStore(str(tmp_path / 'junk.h5'))
    with pytest.raises(FlowStoreError, match='flow store not found'):
        FlowStore(str(tmp_path / 'missing.h5'))


def _batch(pairs, k=2):
    n = len(pairs)
    return {'voxel1': np.arange(n, dtype=np.float32).reshape(n, 1), 'voxel2': np.zeros((n, 1), np.float32),
            'point1': np.zeros((n, k, 3), np.float32), 'point2': np.zeros((n, k, 3), np.float32),
            'id1': np.array([a for a, _ in pairs]), 'id2': np.array([b for _, b in pairs])}


def test_rebatching_skips_pairs_without_a_flow(tmp_path):
    path = str(tmp_path / 'flows.h5')
    with FlowStoreWriter(path, SHAPE, 't') as w:
        for i, (a, b) in enumerate([('a', 'b'), ('b', 'a'), ('a', 'c'), ('c', 'b')]):
            w.write(a, b, _flow(i))
    source = [_batch([('a', 'b'), ('x', 'y'), ('b', 'a')]), _batch([('y', 'x'), ('a', 'c'), ('c', 'b')], k=4)]
    with FlowStore(path) as store:
        assert store.missing([('a', 'b'), ('x', 'y')]) == [('x', 'y')]
        out = list(with_teacher_flows(iter(source), store, 3))
        assert [len(b['id1']) for b in out] == [3, 1]
        assert list(out[0]['id1']) == ['a', 'b', 'a'] and list(out[0]['id2']) == ['b', 'a', 'c']
        assert out[0]['point1'].shape == (3, 4, 3) and np.all(out[0]['point1'][:2, 2:] == -1)
        assert out[0]['teacher_flow'].shape == (3,) + tuple(SHAPE)
        assert np.allclose(out[1]['teacher_flow'][0], store.flow('c', 'b'))
