"""HDF5 store of teacher flows for offline ALDK (SPEC section 5). h5py only: no TensorFlow, no pickle.

Layout of a store file:
  - one dataset per (fixed, moving) pair at the root, named ``pair_key(id1, id2)`` =
    "<id1>-<id2>" with the slash-free scan ids of ``dataset.display_id`` (the original's
    convention); shape [X, Y, Z, 3], float16, displacement in voxels (channel k along array
    axis k + 1), the teacher's final composed flow of the UN-augmented pair; chunked one
    X-slab per chunk, gzip level 4 with the shuffle filter (a 128^3 flow: 12 MiB raw).
  - root attributes: 'format' = FORMAT, 'version' = VERSION, 'flow_shape' = [X, Y, Z, 3] and
    'teacher' = the checkpoint prefix the flows come from.

Writing is incremental and resumable: ``FlowStoreWriter`` opens an existing store in append
mode (refusing one of another flow shape or another teacher), writes each flow under a
temporary name, renames it to its key (an HDF5 link move) and flushes the file. A run that is
killed therefore leaves complete flows plus at most one temporary dataset, which the next
writer deletes; pairs already stored are skipped by the caller (``writer.has``). HDF5 is not
journaled: a kill in the middle of a metadata flush can still corrupt the file, which is then
refused with a one-line error (start a new store).

float16 keeps about three significant digits: a flow of 20 voxels is stored within 0.01 voxel.
"""
import os

import h5py
import numpy as np

from errors import UserError

from .dataset import display_id

FORMAT = 'ldr-aldk-teacher-flows'
VERSION = 1
PARTIAL_PREFIX = '.partial-'
COMPRESSION = {'compression': 'gzip', 'compression_opts': 4, 'shuffle': True}


class FlowStoreError(UserError, ValueError):
    """A problem with a flow store; the message is one line naming the store."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))


def pair_key(id1, id2):
    """Store key of the pair (fixed id1, moving id2): "<id1>-<id2>", slashes replaced by '_'."""
    return '{}-{}'.format(display_id(str(id1)), display_id(str(id2)))


def _open(path, mode):
    try:
        return h5py.File(path, mode)
    except (OSError, ValueError) as e:
        raise FlowStoreError('{}: cannot open the flow store ({})'.format(path, str(e).splitlines()[0]))


def _check_header(handle, path, flow_shape=None):
    """The store's flow shape (list of 4 ints); FlowStoreError if it is not a flow store or the
    shape differs from ``flow_shape``."""
    if handle.attrs.get('format') != FORMAT:
        raise FlowStoreError('{}: not a teacher flow store (no format attribute {!r}); write one with '
                             'eval.py --writing_flow'.format(path, FORMAT))
    stored = [int(s) for s in handle.attrs['flow_shape']]
    if flow_shape is not None and stored != list(flow_shape):
        raise FlowStoreError('{}: stored flows have shape {} but this run needs {}'.format(
            path, stored, list(flow_shape)))
    return stored


class _StoreFile:
    """An open store file (``self._file``, h5py) closed by ``close`` or on leaving a ``with`` block."""

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FlowStoreWriter(_StoreFile):
    """Appends teacher flows to a store (created if missing). Use as a context manager.

    flow_shape: [X, Y, Z, 3]; teacher: the checkpoint prefix the flows come from (an existing
    store written from another teacher is refused, so one store never mixes teachers).
    """

    def __init__(self, path, flow_shape, teacher):
        self.path = path
        self.flow_shape = [int(s) for s in flow_shape]
        if len(self.flow_shape) != 4 or self.flow_shape[3] != 3:
            raise FlowStoreError('{}: flow shape must be [X, Y, Z, 3], got {}'.format(path, self.flow_shape))
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        exists = os.path.exists(path)
        self._file = _open(path, 'a')
        try:
            if exists and len(self._file.attrs):
                _check_header(self._file, path, self.flow_shape)
                stored_teacher = self._file.attrs.get('teacher')
                if stored_teacher != teacher:
                    raise FlowStoreError('{}: holds flows of teacher {} but this run writes flows of {}; '
                                         'use another store'.format(path, stored_teacher, teacher))
            elif exists and len(self._file):
                raise FlowStoreError('{}: an HDF5 file that is not a teacher flow store'.format(path))
            else:
                self._file.attrs['format'] = FORMAT
                self._file.attrs['version'] = VERSION
                self._file.attrs['flow_shape'] = self.flow_shape
                self._file.attrs['teacher'] = teacher
            for name in [n for n in self._file if n.startswith(PARTIAL_PREFIX)]:
                del self._file[name]
            self._file.flush()
        except BaseException:
            self._file.close()
            raise

    def has(self, id1, id2):
        return pair_key(id1, id2) in self._file

    def __len__(self):
        return len(self._file)

    def write(self, id1, id2, flow):
        """Store one flow [X, Y, Z, 3] (voxels) as float16 under pair_key(id1, id2), replacing any."""
        flow = np.asarray(flow)
        if list(flow.shape) != self.flow_shape:
            raise FlowStoreError('{}: flow of {} has shape {}, the store holds {}'.format(
                self.path, pair_key(id1, id2), list(flow.shape), self.flow_shape))
        key = pair_key(id1, id2)
        partial = PARTIAL_PREFIX + key
        chunks = (1,) + tuple(self.flow_shape[1:])
        self._file.create_dataset(partial, data=flow.astype(np.float16), chunks=chunks, **COMPRESSION)
        if key in self._file:
            del self._file[key]
        self._file.move(partial, key)
        self._file.flush()


class FlowStore(_StoreFile):
    """Reads a store. ``image_size`` [X, Y, Z] (optional) must match the stored flows' shape."""

    def __init__(self, path, image_size=None):
        self.path = path
        if not os.path.isfile(path):
            raise FlowStoreError('{}: flow store not found'.format(path))
        self._file = _open(path, 'r')
        try:
            expected = None if image_size is None else [int(s) for s in image_size] + [3]
            self.flow_shape = _check_header(self._file, path, expected)
        except BaseException:
            self._file.close()
            raise
        self.teacher = self._file.attrs.get('teacher')

    def __len__(self):
        return sum(1 for name in self._file if not name.startswith(PARTIAL_PREFIX))

    def has(self, id1, id2):
        return pair_key(id1, id2) in self._file

    def flow(self, id1, id2):
        """The stored flow of (id1, id2) as float32 [X, Y, Z, 3]; FlowStoreError if absent."""
        key = pair_key(id1, id2)
        if key not in self._file:
            raise FlowStoreError('{}: no flow for pair {}'.format(self.path, key))
        data = self._file[key]
        if list(data.shape) != self.flow_shape:
            raise FlowStoreError('{}: flow {} has shape {}, the store header says {}'.format(
                self.path, key, list(data.shape), self.flow_shape))
        return data[()].astype(np.float32)

    def missing(self, pairs):
        """The (id1, id2) pairs of ``pairs`` that have no stored flow."""
        return [(a, b) for a, b in pairs if not self.has(a, b)]


def _take(batch, index):
    return {k: v[index:index + 1] for k, v in batch.items()}


def _stack(items):
    """Concatenate one-pair batches; landmark arrays of different K are padded with -1 rows."""
    out = {}
    for key in items[0]:
        arrays = [item[key] for item in items]
        if key.startswith('point'):
            k = max(a.shape[1] for a in arrays)
            arrays = [np.concatenate([a, np.full((1, k - a.shape[1], 3), -1, a.dtype)], axis=1) for a in arrays]
        out[key] = np.concatenate(arrays, axis=0)
    return out


def with_teacher_flows(batches, store, batch_size):
    """Re-batch ``batches`` (dicts of a Dataset generator) to the pairs ``store`` holds.

    Yields batches of ``batch_size`` pairs (the last one of a finite source may be smaller),
    each with an extra 'teacher_flow' float32 [B, X, Y, Z, 3]; pairs without a stored flow are
    dropped (count them beforehand with ``store.missing(dataset.pairs(subset, training=True))``).
    """
    pending = []
    for batch in batches:
        for i in range(len(batch['id1'])):
            if store.has(batch['id1'][i], batch['id2'][i]):
                item = _take(batch, i)
                item['teacher_flow'] = store.flow(batch['id1'][i], batch['id2'][i])[None]
                pending.append(item)
        while len(pending) >= batch_size:
            yield _stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield _stack(pending)
