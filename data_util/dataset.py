"""Dataset specs, HDF5 scan reading and pair batches for registration.

The dataset spec is the JSON schema of the original Recursive Cascaded Networks code::

    {"files": {name: {"path": "datasets/x.h5", "type": "HDF5"}, ...},
     "image_size": [X, Y, Z],
     "image_type": "liver" | "brain",
     "atlas": "file/id",                          (optional)
     "segmentation_class_value": {name: value},   (optional)
     "subsets": {subset: ["file/id", ...]},
     "schemes": {"1": {subset: fraction}, "2": {...}, name: {...}},
     "preprocessing": {...}}                      (optional, written by data_util.prepare)

Scheme "1" is the training scheme and "2" the validation scheme; other named schemes are
allowed (the original liver spec has "sliver", "lits" and "lspig").

Scan ids ("entries") are written "file/id": the part before the first slash names a file of
"files" and the rest is the HDF5 path of the scan's group inside it. When the part before the
first slash is not a file name and a file is keyed "/", the whole entry is looked up in that
file (the original liver spec keys the MSD file "/" and lists entries like "liver/12").
Batches carry these spec entries as ids; `display_id` gives the slash-free form
("file_id", the original's convention) for stores keyed "id1-id2".

Relative file paths are resolved against the current working directory at the time the
Dataset is built (the original's convention: "datasets/x.h5" relative to the repository root)
and else against the spec file's directory. If both candidates exist and are different files
the path is ambiguous and refused.

Each scan is an HDF5 group holding `volume` (X, Y, Z; intensities 0..255, any numeric dtype),
optional `segmentation` (same shape; 0/255 masks or integer label values) and optional
`point` (k x 3 landmarks in voxel coordinates, rows of -1 where missing). A scan is validated
when it is first read: volume shape equal to image_size, numeric and finite values within
0..255 (0.5 of tolerance), segmentation of the volume's shape, point of shape k x 3 with every
row either all -1 or inside the volume (-0.5..size - 0.5 per axis, the outer voxels' edges, as
the converter writes them; rows with a negative coordinate then become all -1). A group
written by data_util.prepare also holds its geometry (attributes, see data_util.prepare.Geometry)
and, with labels, `original_segmentation` (the label map on the original file's grid):
`Dataset.original` serves both, so that evaluation measures overlap on the scans' own grids.
`Dataset.check` validates whole subsets up front; `Dataset.check_segmentations` refuses pairs
whose fixed and moving segmentations are both empty (Dice undefined), for evaluation.

Every problem with the inputs raises `DataError` with a one-line message naming the culprit.
"""
import collections
import json
import os
import threading

import h5py
import numpy as np

from errors import UserError

SPEC_KEYS = ('files', 'image_size', 'image_type', 'atlas', 'segmentation_class_value',
             'subsets', 'schemes', 'task', 'description', 'preprocessing')
IMAGE_TYPES = ('liver', 'brain')
DEFAULT_IMAGE_SIZE = [128, 128, 128]
DEFAULT_NUM_POINTS = 6
DEFAULT_CACHE_SIZE = 64
TRAIN_PAIRS = ('protocol', 'all')
INTENSITY_TOLERANCE = 0.5


class DataError(UserError, ValueError):
    """A problem with the dataset spec or the scans; the message is always a single line."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))


def display_id(entry):
    """The slash-free form of a scan entry: 'youyi/0042' -> 'youyi_0042' (the original's ids)."""
    return entry.replace('/', '_')


def _scheme_key(key):
    """Scheme keys that are integers ("1", "2") become ints, like the original; others stay."""
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return key
    return key


def split_entry(entry, files):
    """Splits a spec entry into (file name, HDF5 key) given the spec's "files" mapping.

    Raises DataError when the entry names no file.
    """
    if not isinstance(entry, str) or not entry:
        raise DataError('scan entry {!r} is not a non-empty string'.format(entry))
    head, sep, tail = entry.partition('/')
    if sep and head in files:
        if not tail:
            raise DataError('scan entry {!r} has an empty id after the file name'.format(entry))
        return head, tail
    if '/' in files:
        return '/', entry
    raise DataError('scan entry {!r} names no file of "files" (known: {})'.format(
        entry, ', '.join(sorted(files))))


def _check_number(value, what, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise DataError('{}: {} must be a finite number, got {!r}'.format(path, what, value))


def load_spec(path):
    """Reads and validates a JSON dataset spec; returns it as a dict (the JSON content).

    Only the spec is read: the HDF5 files it names need not exist. Required keys: files,
    image_type, subsets, schemes; image_size defaults to [128, 128, 128] like the original.
    Scheme keys are left as written (Dataset converts "1"/"2" to ints).
    """
    try:
        with open(path, 'r') as f:
            text = f.read()
    except OSError as e:
        raise DataError('{}: cannot read dataset spec ({})'.format(path, e.strerror or e))
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise DataError('{}: invalid JSON ({})'.format(path, e))
    if not isinstance(spec, dict):
        raise DataError('{}: the spec must be a JSON object, got {}'.format(
            path, type(spec).__name__))
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise DataError('{}: unknown key(s) {} (known: {})'.format(
            path, ', '.join(repr(k) for k in unknown), ', '.join(SPEC_KEYS)))
    for key in ('files', 'image_type', 'subsets', 'schemes'):
        if key not in spec:
            raise DataError('{}: missing key {!r}'.format(path, key))

    files = spec['files']
    if not isinstance(files, dict) or not files:
        raise DataError('{}: "files" must be a non-empty object'.format(path))
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get('path'), str) \
                or not entry['path']:
            raise DataError('{}: file {!r} must be an object with a "path" string'.format(
                path, name))
        if entry.get('type', 'HDF5') != 'HDF5':
            raise DataError('{}: file {!r} has type {!r}; only "HDF5" is supported'.format(
                path, name, entry.get('type')))

    size = spec.get('image_size', DEFAULT_IMAGE_SIZE)
    if not isinstance(size, list) or len(size) != 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise DataError('{}: "image_size" must be a list of 3 positive ints, got {!r}'.format(
            path, size))

    if spec['image_type'] not in IMAGE_TYPES:
        raise DataError('{}: "image_type" must be one of {}, got {!r}'.format(
            path, '/'.join(IMAGE_TYPES), spec['image_type']))

    classes = spec.get('segmentation_class_value')
    if classes is not None:
        if not isinstance(classes, dict) or not classes:
            raise DataError('{}: "segmentation_class_value" must be a non-empty object'.format(
                path))
        for name, value in classes.items():
            _check_number(value, 'segmentation_class_value[{!r}]'.format(name), path)

    subsets = spec['subsets']
    if not isinstance(subsets, dict):
        raise DataError('{}: "subsets" must be an object'.format(path))
    for name, entries in subsets.items():
        if not isinstance(entries, list):
            raise DataError('{}: subset {!r} must be a list of scan entries'.format(path, name))
        for entry in entries:
            try:
                split_entry(entry, files)
            except DataError as e:
                raise DataError('{}: subset {!r}: {}'.format(path, name, e))

    schemes = spec['schemes']
    if not isinstance(schemes, dict):
        raise DataError('{}: "schemes" must be an object'.format(path))
    for key, scheme in schemes.items():
        if not isinstance(scheme, dict) or not scheme:
            raise DataError('{}: scheme {!r} must be a non-empty object {{subset: fraction}}'
                            .format(path, key))
        for subset, fraction in scheme.items():
            if subset not in subsets:
                raise DataError('{}: scheme {!r} references missing subset {!r}'.format(
                    path, key, subset))
            _check_number(fraction, 'scheme {!r} fraction of {!r}'.format(key, subset), path)
            if fraction < 0:
                raise DataError('{}: scheme {!r} has a negative fraction for {!r}'.format(
                    path, key, subset))
        if sum(scheme.values()) <= 0:
            raise DataError('{}: scheme {!r} has no subset with a positive fraction'.format(
                path, key))
    if len({_scheme_key(k) for k in schemes}) != len(schemes):
        raise DataError('{}: scheme keys collide once integers are parsed: {}'.format(
            path, ', '.join(repr(k) for k in schemes)))

    if 'atlas' in spec:
        atlas = spec['atlas']
        if not isinstance(atlas, str):
            raise DataError('{}: "atlas" must be a "file/id" string, got {!r}'.format(
                path, atlas))
        try:
            split_entry(atlas, files)
        except DataError as e:
            raise DataError('{}: atlas not in files: {}'.format(path, e))

    task = spec.get('task', 'registration')
    if not isinstance(task, (str, list)):
        raise DataError('{}: "task" must be a string or a list, got {!r}'.format(path, task))
    if not isinstance(spec.get('description', ''), str):
        raise DataError('{}: "description" must be a string'.format(path))
    return spec


class _PairSequence:
    """The (fixed, moving) pairs of one subset as a lazy sequence (a training subset of n
    scans has n (n - 1) ordered pairs; they are computed from their index, not stored).

    mode 'atlas': (atlas, s) for every scan s but the atlas; 'adjacent': (s0, s1), (s1, s0),
    (s2, s3), (s3, s2), ... (an odd last scan is left out); 'all': every ordered pair
    (s_i, s_j), i != j, in row-major order of (i, j).
    """

    def __init__(self, entries, mode, atlas=None):
        self.mode = mode
        self.atlas = atlas
        if mode == 'atlas':
            self.entries = [e for e in entries if e != atlas]
            self.length = len(self.entries)
        elif mode == 'adjacent':
            self.entries = list(entries)
            self.length = len(entries) // 2 * 2
        else:
            self.entries = list(entries)
            self.length = len(entries) * (len(entries) - 1)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self.mode == 'atlas':
            return self.atlas, self.entries[index]
        if self.mode == 'adjacent':
            a, b = self.entries[index // 2 * 2], self.entries[index // 2 * 2 + 1]
            return (a, b) if index % 2 == 0 else (b, a)
        n = len(self.entries)
        i, r = divmod(index, n - 1)
        return self.entries[i], self.entries[r if r < i else r + 1]


class _Hdf5File:
    """One HDF5 file of a spec, opened read-only on first use."""

    def __init__(self, name, path, candidates):
        self.name = name
        self.path = path
        self.candidates = candidates
        self.handle = None
        self.location = None

    def _resolve(self):
        existing = [c for c in self.candidates if os.path.isfile(c)]
        if not existing:
            tried = ' or '.join(dict.fromkeys(self.candidates))
            raise DataError('{}: HDF5 file not found (file {!r}; tried {})'.format(
                self.path, self.name, tried))
        first = existing[0]
        for other in existing[1:]:
            if not os.path.samefile(first, other):
                raise DataError('{}: ambiguous relative path, both {} and {} exist'.format(
                    self.path, first, other))
        return first

    def open(self):
        """The open h5py.File; raises DataError if missing or not a readable HDF5 file."""
        if self.handle is None:
            location = self._resolve()
            try:
                self.handle = h5py.File(location, 'r')
            except (OSError, ValueError) as e:
                raise DataError('{}: not a readable HDF5 file ({})'.format(location, e))
            self.location = location
        return self.handle

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class Dataset:
    """Pairs of scans from a dataset spec, served as numpy batches.

    Args:
        spec_path: path of the JSON dataset spec.
        batch_size: default batch size of `generator`.
        paired: adjacent pairs (s0,s1),(s1,s0),(s2,s3),... instead of all ordered pairs
            (ignored when the spec has an atlas).
        train_pairs: 'protocol' (default): the training generator (loop=True) serves the same
            pairs as evaluation; 'all': every ordered pair among the subset's scans and the
            atlas, so a model learns to register to any fixed scan, not only to the atlas.
        all_pairs: every ordered pair among a subset's scans, also when the spec has an atlas
            (e.g. the 72 inter-subject pairs of LPBA40's 9 test scans, not each to the atlas).
        cache_size: number of decoded scans kept in memory (least recently used dropped).
        Any other keyword argument raises DataError naming it.

    Attributes:
        image_size: [X, Y, Z] ints; image_type: 'liver' or 'brain';
        segmentation_class_value: {name: value} or None; atlas: the atlas entry or None;
        subsets: {name: [entry, ...]}; schemes: {key: {subset: fraction}} with "1"/"2" as ints;
        num_points: K, the landmark rows per sample in batches: 6, or more if a scan read so
            far (see `check`) has more landmark rows.
    """

    def __init__(self, spec_path, batch_size=4, paired=False, cache_size=DEFAULT_CACHE_SIZE,
                 train_pairs='protocol', all_pairs=False, **data_args):
        if data_args:
            raise DataError('unknown data argument(s) {} (known: paired, cache_size, train_pairs, all_pairs)'.format(
                ', '.join(repr(k) for k in sorted(data_args))))
        if train_pairs not in TRAIN_PAIRS:
            raise DataError('data argument train_pairs must be one of {}, got {!r}'.format(
                ', '.join(repr(v) for v in TRAIN_PAIRS), train_pairs))
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
            raise DataError('data argument cache_size must be a positive int, got {!r}'.format(
                cache_size))
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise DataError('batch_size must be a positive int, got {!r}'.format(batch_size))
        spec = load_spec(spec_path)
        self.spec_path = spec_path
        self.batch_size = batch_size
        self.paired = bool(paired)
        self.train_pairs = train_pairs
        self.all_pairs = bool(all_pairs)
        self.preprocessing = spec.get('preprocessing')
        self.cache_size = cache_size
        self.image_size = [int(s) for s in spec.get('image_size', DEFAULT_IMAGE_SIZE)]
        self.image_type = spec['image_type']
        self.segmentation_class_value = spec.get('segmentation_class_value')
        self.atlas = spec.get('atlas')
        self.task = spec.get('task', 'registration')
        self.subsets = {k: list(v) for k, v in spec['subsets'].items()}
        self.schemes = {_scheme_key(k): dict(v) for k, v in spec['schemes'].items()}
        self.num_points = DEFAULT_NUM_POINTS

        cwd = os.getcwd()
        spec_dir = os.path.dirname(os.path.abspath(spec_path))
        self._files = {}
        for name, entry in spec['files'].items():
            path = os.path.expanduser(entry['path'])
            if os.path.isabs(path):
                candidates = [path]
            else:
                candidates = [os.path.join(cwd, path), os.path.join(spec_dir, path)]
            self._files[name] = _Hdf5File(name, entry['path'], candidates)
        self._cache = collections.OrderedDict()
        self._lock = threading.RLock()

    def close(self):
        """Closes the open HDF5 files and empties the cache."""
        with self._lock:
            for f in self._files.values():
                f.close()
            self._cache.clear()

    # ---- subsets and pairs ----

    def _subset_fractions(self, subset):
        """[(subset name, fraction)] of a scheme key (1, '1', 'sliver') or a subset name."""
        key = _scheme_key(subset)
        if key in self.schemes:
            return [(name, float(f)) for name, f in self.schemes[key].items() if f > 0]
        if subset in self.subsets:
            return [(subset, 1.0)]
        raise DataError('unknown scheme or subset {!r} (schemes: {}; subsets: {})'.format(
            subset, ', '.join(str(k) for k in self.schemes), ', '.join(self.subsets)))

    def scans(self, subset):
        """The entries of a scheme (its subsets with fraction > 0) or of a subset, in order."""
        entries = []
        for name, _ in self._subset_fractions(subset):
            entries.extend(self.subsets[name])
        return list(dict.fromkeys(entries))

    def _subset_pairs(self, name, training=False):
        """The pairs of one subset as a lazy _PairSequence (training: of the training generator)."""
        entries = self.subsets[name]
        if training and self.train_pairs == 'all':
            scans = entries + ([self.atlas] if self.atlas is not None else [])
            return _PairSequence(list(dict.fromkeys(scans)), 'all')
        if self.atlas is not None and not self.all_pairs:
            return _PairSequence(entries, 'atlas', self.atlas)
        return _PairSequence(entries, 'adjacent' if self.paired else 'all')

    def pairs(self, subset, training=False):
        """[(fixed entry, moving entry)] of a scheme key or a subset name.

        With an atlas: (atlas, scan) for every scan but the atlas itself; else with
        paired=True adjacent pairs; else all ordered pairs i != j. A scheme lists the pairs of
        each of its subsets with fraction > 0, subset after subset. training=True: the pairs
        the training generator (loop=True) draws from instead, which differ with
        train_pairs='all' (every ordered pair among the subset's scans and the atlas).
        """
        pairs = []
        for name, _ in self._subset_fractions(subset):
            pairs.extend(self._subset_pairs(name, training))
        return pairs

    def num_pairs(self, subset, training=False):
        """Number of pairs of a scheme key or subset name (one evaluation pass; training=True:
        the training generator's pairs, as in `pairs`)."""
        return sum(len(self._subset_pairs(name, training)) for name, _ in self._subset_fractions(subset))

    # ---- scans ----

    def _read(self, entry):
        """Reads and validates one scan: {'volume', 'segmentation' or None, 'point' or None}."""
        name, key = split_entry(entry, self._files)
        hfile = self._files[name]
        handle = hfile.open()
        where = '{}: scan {!r}'.format(hfile.location, key)
        try:
            group = handle.get(key)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise DataError('{}: cannot be read ({})'.format(where, e))
        if group is None:
            raise DataError('{} not found (entry {!r})'.format(where, entry))
        if not isinstance(group, h5py.Group):
            raise DataError('{} is not an HDF5 group (entry {!r})'.format(where, entry))

        def dataset(field):
            if field not in group:
                return None
            item = group[field]
            if not isinstance(item, h5py.Dataset):
                raise DataError('{}: {!r} is not an HDF5 dataset'.format(where, field))
            if item.dtype.kind not in 'biuf':
                raise DataError('{}: {!r} has non-numeric dtype {}'.format(
                    where, field, item.dtype))
            try:
                array = item[()]
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise DataError('{}: {!r} cannot be read ({})'.format(where, field, e))
            if array.dtype.kind == 'f':
                array = array.astype(np.float32, copy=False)
                if not np.all(np.isfinite(array)):
                    raise DataError('{}: {!r} has non-finite values (NaN/Inf)'.format(
                        where, field))
            return array

        volume = dataset('volume')
        if volume is None:
            raise DataError('{} has no "volume"'.format(where))
        if list(volume.shape) != self.image_size:
            raise DataError('{}: volume shape {} does not match image_size {}'.format(
                where, list(volume.shape), self.image_size))
        low, high = float(volume.min()), float(volume.max())
        if low < -INTENSITY_TOLERANCE or high > 255 + INTENSITY_TOLERANCE:
            raise DataError('{}: volume values {:g}..{:g} are outside 0..255'.format(
                where, low, high))
        if volume.dtype.kind == 'f' and 0 < high <= 1.0:
            raise DataError('{}: volume values {:g}..{:g} look scaled to 0..1; volumes are stored as 0..255 '
                            '(multiply by 255)'.format(where, low, high))

        segmentation = dataset('segmentation')
        if segmentation is not None and segmentation.shape != volume.shape:
            raise DataError('{}: segmentation shape {} differs from volume shape {}'.format(
                where, list(segmentation.shape), list(volume.shape)))

        point = dataset('point')
        if point is not None:
            if point.ndim != 2 or point.shape[1] != 3:
                raise DataError('{}: point shape {} is not k x 3'.format(
                    where, list(point.shape)))
            point = point.astype(np.float32)
            missing = np.all(point == -1, axis=1)
            inside = np.all((point >= -0.5) & (point <= np.asarray(self.image_size) - 0.5), axis=1)
            outside = np.flatnonzero(~missing & ~inside)
            if len(outside):
                raise DataError('{}: landmark row {} {} lies outside the volume {} (voxel coordinates '
                                '-0.5..size - 0.5; a row of -1 marks a missing point)'.format(
                                    where, outside[0], point[outside[0]].tolist(), self.image_size))
            point[np.any(point < 0, axis=1)] = -1
        return {'volume': volume, 'segmentation': segmentation, 'point': point}

    def scan(self, entry):
        """One scan as numpy arrays, validated and cached.

        Returns {'volume': [X, Y, Z] (stored dtype, float32 if floating), 'segmentation':
        [X, Y, Z] or None, 'point': [k, 3] float32 voxel coordinates (rows -1 = missing) or
        None}. The arrays are shared with the cache: do not modify them.
        """
        with self._lock:
            if entry in self._cache:
                self._cache.move_to_end(entry)
                return self._cache[entry]
            data = self._read(entry)
            if data['point'] is not None:
                self.num_points = max(self.num_points, len(data['point']))
            self._cache[entry] = data
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return data

    def original(self, entry):
        """Where a scan came from, for measuring on its own grid: (Geometry, label map [X, Y, Z]
        on the original file's grid), or None when the group lacks either (HDF5 files not
        written by data_util.prepare, or scans without labels). Not cached (~6 MB a brain)."""
        from data_util.geometry import Geometry, GeometryError
        name, key = split_entry(entry, self._files)
        with self._lock:
            group = self._files[name].open()[key]
            if 'original_segmentation' not in group:
                return None
            try:
                geometry = Geometry.from_attrs(group.attrs)
            except GeometryError:
                return None
            labels = group['original_segmentation'][()]
        if labels.shape != tuple(geometry.original_size):
            raise DataError('{}: scan {!r}: original_segmentation shape {} differs from its original_size {}'.format(
                self._files[name].location, key, list(labels.shape), list(geometry.original_size)))
        return geometry, labels

    def check(self, subsets):
        """Reads and validates every scan of the given scheme keys / subset names (and the
        atlas, if any); raises DataError at the first bad one. Returns the number of scans.
        """
        if isinstance(subsets, (str, int)):
            subsets = [subsets]
        entries = []
        for subset in subsets:
            entries.extend(self.scans(subset))
        if self.atlas is not None:
            entries.append(self.atlas)
        entries = list(dict.fromkeys(entries))
        for entry in entries:
            self.scan(entry)
        return len(entries)

    def _has_foreground(self, segmentation):
        """Whether a segmentation holds a voxel the metrics count: a class value, or > 128 in a
        0/255 mask (network.metrics.class_masks)."""
        if self.segmentation_class_value is None:
            return bool(np.any(segmentation > 128))
        labels = np.asarray(segmentation, np.float32)
        return any(np.any(np.abs(labels - value) < 0.5) for value in self.segmentation_class_value.values())

    def check_segmentations(self, subset):
        """Raises DataError naming the first pair of a scheme key / subset name whose fixed and
        moving scans both store a segmentation without foreground: Dice is undefined there.
        Scans without a stored segmentation are not concerned."""
        entries = self.scans(subset) + ([self.atlas] if self.atlas is not None else [])
        empty = set()
        for entry in dict.fromkeys(entries):
            segmentation = self.scan(entry)['segmentation']
            if segmentation is not None and not self._has_foreground(segmentation):
                empty.add(entry)
        if not empty:
            return
        for fixed, moving in self.pairs(subset):
            if fixed in empty and moving in empty:
                raise DataError('{}: pair fixed {!r}, moving {!r} of {!r}: both segmentations are empty '
                                '(no labelled voxel), so Dice is undefined; fix the labels or leave the '
                                'pair out of the subset'.format(self.spec_path, fixed, moving, subset))

    # ---- batches ----

    def _batch(self, pairs):
        """Stacks pairs into a batch dict (see `generator`)."""
        n = len(pairs)
        datas = [(self.scan(a), self.scan(b)) for a, b in pairs]
        k = self.num_points
        shape = [n] + self.image_size + [1]
        batch = {'voxel1': np.zeros(shape, np.float32), 'voxel2': np.zeros(shape, np.float32),
                 'seg1': np.zeros(shape, np.float32), 'seg2': np.zeros(shape, np.float32),
                 'point1': np.full([n, k, 3], -1, np.float32),
                 'point2': np.full([n, k, 3], -1, np.float32)}
        for i, pair_data in enumerate(datas):
            for side, data in zip('12', pair_data):
                batch['voxel' + side][i, ..., 0] = data['volume']
                if data['segmentation'] is not None:
                    batch['seg' + side][i, ..., 0] = data['segmentation']
                if data['point'] is not None:
                    batch['point' + side][i, :len(data['point'])] = data['point']
        batch['id1'] = np.array([a for a, _ in pairs], dtype=str)
        batch['id2'] = np.array([b for _, b in pairs], dtype=str)
        return batch

    def generator(self, subset, batch_size=None, loop=False, shuffle=None, seed=None, skip=0):
        """Yields batches of pairs of a scheme key (1 = training, 2 = validation, or a named
        scheme) or a subset name.

        Each batch is a dict: 'voxel1' (FIXED) and 'voxel2' (MOVING) float32 [B, X, Y, Z, 1]
        with the stored intensities 0..255; 'seg1', 'seg2' float32 [B, X, Y, Z, 1] holding the
        stored segmentation values (0 where a scan has none); 'point1', 'point2' float32
        [B, K, 3] landmark voxel coordinates (-1 where missing; K = num_points); 'id1', 'id2'
        numpy str arrays [B] of spec entries ("file/id").

        loop=False: every pair once, in `pairs` order (shuffled if shuffle=True); the last
        batch may be smaller. loop=True (training; its pairs follow `train_pairs`): endless;
        each batch element picks one of the scheme's
        subsets with probability proportional to its fraction and takes that subset's next
        pair; a subset's pairs are reshuffled at every pass (shuffle defaults to loop).
        `seed` makes the order reproducible; with loop=True, `skip` batches of that order are
        passed over without reading any scan (a resumed training run goes on where it stopped).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise DataError('batch_size must be a positive int, got {!r}'.format(batch_size))
        shuffle = loop if shuffle is None else shuffle
        rng = np.random.default_rng(seed)
        if not loop:
            pairs = self.pairs(subset)
            if not pairs:
                raise DataError('scheme or subset {!r} has no pairs'.format(subset))
            if shuffle:
                pairs = [pairs[i] for i in rng.permutation(len(pairs))]
            return self.batches(pairs, batch_size)
        fractions = self._subset_fractions(subset)
        pair_lists = [self._subset_pairs(name, training=True) for name, _ in fractions]
        for (name, _), pairs in zip(fractions, pair_lists):
            if not pairs:
                raise DataError('subset {!r} of {!r} has no pairs'.format(name, subset))
        stream = self._endless_pairs(pair_lists, [f for _, f in fractions], batch_size, shuffle, rng)
        for _ in range(skip):
            next(stream)
        return (self._batch(pairs) for pairs in stream)

    def batches(self, pairs, batch_size=None):
        """Batches (as `generator` yields them) of the given [(fixed, moving)] entries, in order;
        the last batch may be smaller."""
        batch_size = self.batch_size if batch_size is None else batch_size
        for start in range(0, len(pairs), batch_size):
            yield self._batch(pairs[start:start + batch_size])

    def _endless_pairs(self, pair_lists, fractions, batch_size, shuffle, rng):
        """Endless lists of batch_size pairs (only the draws; `_batch` reads the scans)."""
        probabilities = np.asarray(fractions, np.float64) / np.sum(fractions)

        def cycle(pairs):
            while True:
                order = rng.permutation(len(pairs)) if shuffle else range(len(pairs))
                for i in order:
                    yield pairs[i]

        streams = [cycle(pairs) for pairs in pair_lists]
        while True:
            choices = rng.choice(len(streams), size=batch_size, p=probabilities)
            yield [next(streams[c]) for c in choices]
