"""Data layer: dataset specs, HDF5 validation, pairs and batches, synthetic phantoms."""
import json
import os

import h5py
import numpy as np
import pytest

from data_util.dataset import DataError, Dataset, display_id, load_spec
from data_util.synthetic import STRUCTURES, main as synthetic_main, make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = [6, 5, 4]


def write_h5(path, scans):
    """scans: {id: {field: array}}."""
    with h5py.File(path, 'w') as f:
        for scan_id, fields in scans.items():
            group = f.create_group(scan_id)
            for name, value in fields.items():
                group[name] = value
    return str(path)


def scan(value, seg=None, points=None, shape=SIZE):
    fields = {'volume': np.full(shape, value, np.uint8)}
    if seg is not None:
        fields['segmentation'] = np.full(shape, seg, np.uint8)
    if points is not None:
        fields['point'] = np.asarray(points, np.float32)
    return fields


def write_spec(directory, spec, name='spec.json'):
    path = os.path.join(str(directory), name)
    with open(path, 'w') as f:
        json.dump(spec, f)
    return path


def base_spec(subsets, schemes=None, **extra):
    spec = {'files': {'f': {'path': 'data.h5', 'type': 'HDF5'}}, 'image_size': SIZE,
            'image_type': 'liver', 'subsets': subsets,
            'schemes': schemes or {'1': {name: 1.0 for name in subsets}}}
    spec.update(extra)
    return spec


def assert_one_line(error, *parts):
    message = str(error.value)
    assert '\n' not in message
    for part in parts:
        assert str(part) in message, (part, message)


@pytest.fixture
def simple(tmp_path):
    """Five scans s0..s4 with values 10, 20, ..., 50 in subset 'a'; spec beside the h5."""
    write_h5(tmp_path / 'data.h5', {'s{}'.format(i): scan(10 * (i + 1)) for i in range(5)})
    return write_spec(tmp_path, base_spec({'a': ['f/s{}'.format(i) for i in range(5)]}))


# ---- spec validation ----

def test_spec_unknown_key(tmp_path):
    path = write_spec(tmp_path, base_spec({'a': []}, bogus_key=1))
    with pytest.raises(DataError) as e:
        load_spec(path)
    assert_one_line(e, path, 'bogus_key')


def test_spec_scheme_with_missing_subset(tmp_path):
    path = write_spec(tmp_path, base_spec({'a': ['f/x']}, {'1': {'nope': 1.0}}))
    with pytest.raises(DataError) as e:
        load_spec(path)
    assert_one_line(e, path, 'nope')


def test_spec_atlas_not_in_files(tmp_path):
    path = write_spec(tmp_path, base_spec({'a': ['f/x']}, atlas='lpba/S01'))
    with pytest.raises(DataError) as e:
        load_spec(path)
    assert_one_line(e, path, 'atlas', 'lpba/S01')


def test_spec_invalid_json(tmp_path):
    path = str(tmp_path / 'bad.json')
    with open(path, 'w') as f:
        f.write('{"files": {,}\n\n')
    with pytest.raises(DataError) as e:
        load_spec(path)
    assert_one_line(e, path, 'invalid JSON')


def test_spec_missing_file_and_entry_without_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_spec(str(tmp_path / 'absent.json'))
    assert_one_line(e, 'absent.json')
    path = write_spec(tmp_path, base_spec({'a': ['g/x']}))
    with pytest.raises(DataError) as e:
        load_spec(path)
    assert_one_line(e, "'g/x'", "'a'")


def test_unknown_data_arg(simple):
    with pytest.raises(DataError) as e:
        Dataset(simple, flip=True)
    assert_one_line(e, 'flip')
    assert Dataset(simple, **{'paired': True}).paired


def test_scheme_keys_and_attributes(tmp_path):
    spec = base_spec({'a': ['f/x'], 'b': ['f/y']}, {'1': {'a': 1.0}, '2': {'b': 1.0},
                                                    'named': {'b': 1.0}},
                     segmentation_class_value={'liver': 1})
    ds = Dataset(write_spec(tmp_path, spec))
    assert set(ds.schemes) == {1, 2, 'named'}
    assert ds.image_size == SIZE and ds.image_type == 'liver' and ds.atlas is None
    assert ds.segmentation_class_value == {'liver': 1}
    assert ds.subsets == {'a': ['f/x'], 'b': ['f/y']}


# ---- HDF5 errors ----

def _dataset_with(tmp_path, scans=None, raw_bytes=None):
    path = tmp_path / 'data.h5'
    if raw_bytes is not None:
        path.write_bytes(raw_bytes)
    elif scans is not None:
        write_h5(path, scans)
    ids = sorted(scans) if scans else ['s0']
    return Dataset(write_spec(tmp_path, base_spec({'a': ['f/' + i for i in ids]}))), str(path)


def test_missing_hdf5_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds, path = _dataset_with(tmp_path)
    with pytest.raises(DataError) as e:
        ds.scan('f/s0')
    assert_one_line(e, 'data.h5', 'not found')


def test_corrupt_hdf5_file(tmp_path):
    ds, path = _dataset_with(tmp_path, raw_bytes=np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError) as e:
        ds.scan('f/s0')
    assert_one_line(e, path, 'HDF5')


def test_truncated_hdf5_file(tmp_path):
    full = write_h5(tmp_path / 'full.h5', {'s0': scan(1, shape=[20, 20, 20])})
    with open(full, 'rb') as f:
        data = f.read()
    ds, path = _dataset_with(tmp_path, raw_bytes=data[:len(data) // 2])
    with pytest.raises(DataError) as e:
        ds.scan('f/s0')
    assert_one_line(e, path)


@pytest.mark.parametrize('fields, culprit', [
    (None, "'missing'"),
    ({}, 'volume'),
    ({'volume': np.zeros([6, 5, 5], np.uint8)}, '[6, 5, 5]'),
    ({'volume': np.full(SIZE, np.nan, np.float32)}, 'NaN'),
    ({'volume': np.full(SIZE, np.inf, np.float64)}, 'non-finite'),
    ({'volume': np.full(SIZE, 1000.0, np.float32)}, 'outside 0..255'),
    ({'volume': np.zeros(SIZE, np.uint8), 'segmentation': np.zeros([6, 5, 3])},
     'segmentation shape'),
    ({'volume': np.zeros(SIZE, np.uint8), 'point': np.zeros([6, 2])}, 'point shape'),
])
def test_bad_scan(tmp_path, fields, culprit):
    scans = {'good': scan(5)}
    if fields is not None:
        scans['bad'] = fields
    write_h5(tmp_path / 'data.h5', scans)
    bad = 'f/missing' if fields is None else 'f/bad'
    ds = Dataset(write_spec(tmp_path, base_spec({'a': ['f/good', bad]})))
    assert ds.scan('f/good')['volume'].shape == tuple(SIZE)  # validated lazily, per scan
    with pytest.raises(DataError) as e:
        ds.scan(bad)
    assert_one_line(e, 'data.h5', repr(bad[2:]), culprit)
    with pytest.raises(DataError):
        ds.check('a')
    with pytest.raises(DataError):
        list(ds.generator('a'))


def test_wrong_shape_message_names_both_shapes(tmp_path):
    write_h5(tmp_path / 'data.h5', {'s0': scan(1, shape=[7, 5, 4])})
    ds = Dataset(write_spec(tmp_path, base_spec({'a': ['f/s0']})))
    with pytest.raises(DataError) as e:
        ds.scan('f/s0')
    assert_one_line(e, "'s0'", '[7, 5, 4]', str(SIZE))


def test_path_resolution(tmp_path, monkeypatch):
    spec_dir, work = tmp_path / 'specs', tmp_path / 'work'
    spec_dir.mkdir()
    work.mkdir()
    write_h5(spec_dir / 'data.h5', {'s0': scan(7)})
    spec = write_spec(spec_dir, base_spec({'a': ['f/s0']}))
    monkeypatch.chdir(work)
    assert Dataset(spec).scan('f/s0')['volume'].max() == 7  # beside the spec
    write_h5(work / 'data.h5', {'s0': scan(9)})
    with pytest.raises(DataError) as e:  # both candidates exist: refused, never guessed
        Dataset(spec).scan('f/s0')
    assert_one_line(e, 'ambiguous')
    os.remove(spec_dir / 'data.h5')
    assert Dataset(spec).scan('f/s0')['volume'].max() == 9  # relative to the cwd first


# ---- pairs ----

def test_pairs_all_ordered(simple):
    ds = Dataset(simple)
    pairs = ds.pairs(1)
    assert len(pairs) == 5 * 4 == ds.num_pairs(1) == ds.num_pairs('1') == ds.num_pairs('a')
    assert pairs[:5] == [('f/s0', 'f/s1'), ('f/s0', 'f/s2'), ('f/s0', 'f/s3'),
                         ('f/s0', 'f/s4'), ('f/s1', 'f/s0')]
    assert len(set(pairs)) == 20 and all(a != b for a, b in pairs)


def test_pairs_adjacent(simple):
    ds = Dataset(simple, paired=True)
    assert ds.pairs('a') == [('f/s0', 'f/s1'), ('f/s1', 'f/s0'),
                             ('f/s2', 'f/s3'), ('f/s3', 'f/s2')]


def test_pairs_atlas_protocol(tmp_path):
    write_h5(tmp_path / 'data.h5', {'S{:02d}'.format(i): scan(i) for i in range(1, 11)})
    spec = base_spec({'val': ['f/S{:02d}'.format(i) for i in range(1, 11)]}, atlas='f/S01')
    ds = Dataset(write_spec(tmp_path, spec), paired=True)
    pairs = ds.pairs('val')
    assert pairs == [('f/S01', 'f/S{:02d}'.format(i)) for i in range(2, 11)]
    batches = list(ds.generator('val', batch_size=4))
    assert [len(b['id1']) for b in batches] == [4, 4, 1]
    assert all((b['id1'] == 'f/S01').all() and (b['voxel1'] == 1).all() for b in batches)


def test_pairs_beyond_the_atlas(tmp_path):
    """all_pairs: every ordered pair of a subset despite the atlas; train_pairs='all': the
    training generator draws every ordered pair among the subset and the atlas, and
    pairs(training=True) lists them."""
    write_h5(tmp_path / 'data.h5', {'S{:02d}'.format(i): scan(i) for i in range(1, 6)})
    spec = write_spec(tmp_path, base_spec({'train': ['f/S{:02d}'.format(i) for i in range(2, 6)]}, atlas='f/S01'))
    everything = Dataset(spec, all_pairs=True).pairs('train')
    assert len(everything) == 12 and len(set(everything)) == 12 and all(a != b and 'f/S01' not in (a, b)
                                                                         for a, b in everything)
    protocol = Dataset(spec, train_pairs='all')
    assert protocol.pairs('train') == [('f/S01', 'f/S{:02d}'.format(i)) for i in range(2, 6)]
    drawn = set()
    generator = protocol.generator('train', batch_size=1, loop=True, seed=0)
    for _ in range(200):
        batch = next(generator)
        drawn.add((str(batch['id1'][0]), str(batch['id2'][0])))
    assert len(drawn) == 20 and ('f/S03', 'f/S01') in drawn     # 5 scans, 20 ordered pairs
    # the training pairs, listed (what an offline teacher-flow store must hold): exactly those drawn
    training = protocol.pairs('train', training=True)
    assert len(training) == 20 == protocol.num_pairs('train', training=True) and set(training) == drawn
    assert Dataset(spec).pairs('train', training=True) == protocol.pairs('train')
    batches = list(protocol.batches(training[:5], batch_size=2))
    assert [len(b['id1']) for b in batches] == [2, 2, 1]
    assert [(str(a), str(b)) for batch in batches for a, b in zip(batch['id1'], batch['id2'])] == training[:5]
    with pytest.raises(DataError, match='train_pairs'):
        Dataset(spec, train_pairs='some')


def test_scheme_with_several_subsets(tmp_path):
    write_h5(tmp_path / 'data.h5', {'s{}'.format(i): scan(i) for i in range(7)})
    spec = base_spec({'a': ['f/s0', 'f/s1', 'f/s2'], 'b': ['f/s3', 'f/s4'],
                      'c': ['f/s5', 'f/s6']}, {'1': {'a': 0.75, 'b': 0.25, 'c': 0.0}})
    ds = Dataset(write_spec(tmp_path, spec))
    assert ds.pairs(1) == ds.pairs('a') + ds.pairs('b')
    assert ds.num_pairs(1) == 8
    counts = {'a': 0, 'b': 0}
    gen = ds.generator(1, batch_size=50, loop=True, seed=3)
    for _ in range(8):
        for moving in next(gen)['id2']:
            counts['a' if moving in ds.subsets['a'] else 'b'] += 1
    assert sum(counts.values()) == 400
    assert 0.68 < counts['a'] / 400 < 0.82


def test_unknown_subset_and_empty_pairs(simple, tmp_path):
    ds = Dataset(simple)
    with pytest.raises(DataError) as e:
        ds.pairs('nope')
    assert_one_line(e, 'nope')
    write_h5(tmp_path / 'data.h5', {'s0': scan(1)})
    ds = Dataset(write_spec(tmp_path, base_spec({'one': ['f/s0']}), 'one.json'))
    assert ds.pairs('one') == []
    with pytest.raises(DataError):
        ds.generator('one', loop=True)


# ---- batches ----

def test_batches_shapes_and_values(tmp_path):
    points = [[1, 2, 3], [-1, -1, -1], [0.5, 1.5, 2.5]]
    write_h5(tmp_path / 'data.h5', {'s0': scan(0, seg=255, points=points), 's1': scan(255),
                                    's2': scan(100, seg=3)})
    ds = Dataset(write_spec(tmp_path, base_spec({'a': ['f/s0', 'f/s1', 'f/s2']})))
    batches = list(ds.generator('a', batch_size=4))
    assert [len(b['id1']) for b in batches] == [4, 2]  # 6 pairs, last batch smaller
    b = batches[0]
    for key in ('voxel1', 'voxel2', 'seg1', 'seg2'):
        assert b[key].shape == (4,) + tuple(SIZE) + (1,) and b[key].dtype == np.float32
    assert b['point1'].shape == (4, 6, 3) and b['point1'].dtype == np.float32
    assert list(b['id1']) == ['f/s0', 'f/s0', 'f/s1', 'f/s1']
    assert list(b['id2']) == ['f/s1', 'f/s2', 'f/s0', 'f/s2']
    assert b['voxel1'][0].max() == 0 and b['voxel2'][0].min() == 255
    assert b['voxel2'][1].max() == 100 and set(np.unique(b['seg2'][1])) == {3.0}
    assert set(np.unique(b['seg1'][0])) == {255.0} and not b['seg2'][0].any()
    np.testing.assert_array_equal(b['point1'][0, :3], np.float32(points))
    assert (b['point1'][0, 3:] == -1).all() and (b['point2'][0] == -1).all()
    seen = [(a, m) for batch in batches for a, m in zip(batch['id1'], batch['id2'])]
    assert seen == ds.pairs('a')


def test_more_landmarks_than_six(tmp_path):
    write_h5(tmp_path / 'data.h5', {'s0': scan(1, points=np.ones([8, 3])), 's1': scan(2)})
    ds = Dataset(write_spec(tmp_path, base_spec({'a': ['f/s0', 'f/s1']})))
    assert ds.num_points == 6
    assert ds.check('a') == 2 and ds.num_points == 8
    assert next(ds.generator('a'))['point2'].shape == (2, 8, 3)


def test_loop_reproducible_with_seed(simple):
    ds = Dataset(simple, batch_size=3)

    def ids(seed, n=12):
        gen = ds.generator(1, loop=True, seed=seed)
        return [tuple(next(gen)['id2']) + tuple(next(gen)['id1']) for _ in range(n)]

    first = ids(0)
    assert first == ids(0)
    assert first != ids(1)
    drawn = ids(0, 20)  # 120 draws from 20 pairs: the loop never ends
    assert len(drawn) == 20 and all(len(t) == 6 for t in drawn)


def test_finite_shuffle_visits_every_pair_once(simple):
    ds = Dataset(simple, batch_size=6)
    seen = [(a, m) for b in ds.generator(1, shuffle=True, seed=2)
            for a, m in zip(b['id1'], b['id2'])]
    assert sorted(seen) == sorted(ds.pairs(1)) and seen != ds.pairs(1)


def test_cache_is_bounded(simple):
    ds = Dataset(simple, cache_size=2)
    for i in range(5):
        ds.scan('f/s{}'.format(i))
    assert list(ds._cache) == ['f/s3', 'f/s4']
    assert ds.scan('f/s4') is ds.scan('f/s4')


def test_display_id():
    assert display_id('youyi/0042') == 'youyi_0042'
    assert display_id('liver/12') == 'liver_12'


# ---- the original specs ----

@pytest.mark.parametrize('name', ['liver', 'brain'])
def test_original_specs_load_without_files(name, tmp_path, monkeypatch):
    path = os.path.join(ROOT, 'datasets', name + '.json')
    spec = load_spec(path)
    monkeypatch.chdir(tmp_path)
    ds = Dataset(path)
    assert ds.image_size == [128, 128, 128] and ds.image_type == name
    assert 1 in ds.schemes and 2 in ds.schemes
    entry = ds.pairs(2)[0][1]
    with pytest.raises(DataError) as e:
        ds.scan(entry)
    file_name = entry.split('/')[0]
    assert_one_line(e, spec['files'][file_name]['path'], 'not found')
    if name == 'brain':
        assert ds.atlas == 'lpba/S01' and len(ds.segmentation_class_value) == 56
        assert ds.num_pairs(2) == 39 and all(a == 'lpba/S01' for a, _ in ds.pairs(2))
    else:
        assert set(ds.schemes) == {1, 2, 'sliver', 'lits', 'lspig'}
        assert ds.num_pairs('sliver') == 19 * 18
        assert Dataset(path, paired=True).num_pairs('lspig') == 34
        assert ds.num_pairs(1) == 1025 * 1024  # lazily counted, not materialised
        with pytest.raises(DataError) as e:  # entries without a file prefix go to the "/" file
            ds.scan('liver/0')
        assert_one_line(e, 'msd_dataset.h5')


# ---- synthetic phantoms ----

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """The default synthetic set (12 scans of 64^3): spec path and the arrays of every scan."""
    spec_path = make_synthetic(str(tmp_path_factory.mktemp('synthetic')))
    with h5py.File(os.path.join(os.path.dirname(spec_path), 'synthetic.h5'), 'r') as f:
        scans = {k: {name: f[k][name][()] for name in f[k]} for k in f}
    return spec_path, scans


def test_synthetic_files_and_spec(synthetic):
    spec_path, scans = synthetic
    assert os.path.basename(spec_path) == 'synthetic.json'
    ds = Dataset(spec_path)
    assert ds.image_size == [64, 64, 64] and ds.image_type == 'liver'
    assert [len(ds.subsets[k]) for k in ('train', 'val', 'test')] == [8, 2, 2]
    assert ds.schemes[1] == {'train': 1.0} and ds.schemes[2] == {'val': 1.0}
    assert ds.num_pairs('test') == 2 and ds.check([1, 2, 'test']) == 12
    assert ds.segmentation_class_value is None
    assert len(scans) == 12
    for data in scans.values():
        assert data['volume'].shape == (64, 64, 64) and data['volume'].dtype == np.uint8
        assert data['segmentation'].dtype == np.uint8
        assert set(np.unique(data['segmentation'])) == {0, 255}
        assert 0.05 < (data['segmentation'] > 0).mean() < 0.3
        assert data['volume'].max() > 200 and (data['volume'] == 0).mean() > 0.05
        assert data['point'].shape == (6, 3) and data['point'].dtype == np.float32


def test_synthetic_landmarks_inside_volume_and_organ(synthetic):
    for data in synthetic[1].values():
        points = data['point']
        assert (points >= 0).all() and (points <= 63).all()
        voxels = np.round(points).astype(int)
        assert (data['segmentation'][tuple(voxels.T)] == 255).all()


def test_synthetic_subjects_differ(synthetic):
    scans = list(synthetic[1].values())
    for a, b in zip(scans, scans[1:]):
        assert np.abs(a['volume'].astype(int) - b['volume']).mean() > 3
        assert (a['segmentation'] != b['segmentation']).mean() > 0.005
        assert np.linalg.norm(a['point'] - b['point'], axis=1).max() > 1.5


def _patch(volume, centre, radius=3):
    c = np.round(centre).astype(int)
    return volume[tuple(slice(k - radius, k + radius + 1) for k in c)].astype(np.float64)


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9))


def test_synthetic_landmarks_correspond(synthetic):
    """Landmark i marks the same anatomy in every subject: the patch around it in one subject
    matches the next subject's patch around its landmark i clearly better than around its
    other landmarks or around landmark i shifted by 3 voxels."""
    scans = list(synthetic[1].values())
    shifts = 3 * np.concatenate([np.eye(3), -np.eye(3)])
    for a, b in zip(scans, scans[1:]):
        for i in range(6):
            reference = _patch(a['volume'], a['point'][i])
            match = _ncc(reference, _patch(b['volume'], b['point'][i]))
            others = [_ncc(reference, _patch(b['volume'], b['point'][j]))
                      for j in range(6) if j != i]
            shifted = [_ncc(reference, _patch(b['volume'], b['point'][i] + s)) for s in shifts]
            assert match > 0.5
            assert match > np.mean(others) + 0.25
            assert match > np.mean(shifted) + 0.25


def test_synthetic_reproducible_and_refuses_overwrite(tmp_path):
    kwargs = dict(n_scans=6, image_size=24, seed=5)
    first = make_synthetic(str(tmp_path / 'a'), **kwargs)
    make_synthetic(str(tmp_path / 'b'), **kwargs)
    with h5py.File(str(tmp_path / 'a' / 'synthetic.h5'), 'r') as fa, \
            h5py.File(str(tmp_path / 'b' / 'synthetic.h5'), 'r') as fb:
        for key in fa:
            for name in ('volume', 'segmentation', 'point'):
                np.testing.assert_array_equal(fa[key][name][()], fb[key][name][()])
    before = os.path.getmtime(str(tmp_path / 'a' / 'synthetic.h5'))
    with pytest.raises(DataError) as e:
        make_synthetic(str(tmp_path / 'a'), **kwargs)
    assert_one_line(e, 'synthetic.h5', 'overwrite')
    assert os.path.getmtime(str(tmp_path / 'a' / 'synthetic.h5')) == before
    assert sorted(os.listdir(str(tmp_path / 'a'))) == ['synthetic.h5', 'synthetic.json']
    assert Dataset(first).check('train') == 2
    with pytest.raises(DataError):
        make_synthetic(str(tmp_path / 'c'), n_scans=5, image_size=24)


def test_synthetic_labels_variant(tmp_path):
    spec_path = make_synthetic(str(tmp_path), n_scans=6, image_size=32, labels=4)
    ds = Dataset(spec_path)
    assert ds.segmentation_class_value == {name: i + 1 for i, name in
                                           enumerate(STRUCTURES[:4])}
    batch = next(ds.generator('train', batch_size=2))
    assert set(np.unique(batch['seg1'])) == {0, 1, 2, 3, 4}


def test_synthetic_cli(tmp_path, capsys):
    out = str(tmp_path / 'cli')
    assert synthetic_main([out, '--n_scans', '6', '--image_size', '24', '--seed', '1']) == 0
    summary = capsys.readouterr().out.strip()
    assert '\n' not in summary and 'synthetic.json' in summary and '6 scans' in summary
    assert synthetic_main([out, '--n_scans', '6', '--image_size', '24']) == 2
    assert capsys.readouterr().err.startswith('error: ')
