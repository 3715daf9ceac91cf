"""ANTs SyN (antspyx) as a baseline: ``register(fixed, moving) -> flow``.

antspyx keeps NumPy's axis order (array axis k = ANTs physical axis k with unit spacing,
zero origin and identity direction), and its forward transforms map fixed-space points into
the moving image, i.e. a pull field like ours. The affine and SyN transforms it returns are
composed into one dense displacement field by antsApplyTransforms. All files ANTs writes go
into a private temporary directory that is removed afterwards.
"""
import os
import shutil
import tempfile
import time

import numpy as np

from . import THREADS

os.environ.setdefault('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', str(THREADS))


def register_timed(fixed, moving, type_of_transform='SyN'):
    """Register ``moving`` to ``fixed`` (float [X, Y, Z], 0..255, unit spacing).

    Returns (flow float32 [X, Y, Z, 3] in voxels, our pull convention; seconds of the
    ants.registration call alone).
    """
    import ants
    fixed = np.ascontiguousarray(fixed, np.float32)
    moving = np.ascontiguousarray(moving, np.float32)
    if fixed.shape != moving.shape or fixed.ndim != 3:
        raise ValueError('fixed and moving must be 3-D arrays of one shape, got {} and {}'.format(
            fixed.shape, moving.shape))
    workdir = tempfile.mkdtemp(prefix='ldr_ants_')
    try:
        fixed_image, moving_image = ants.from_numpy(fixed), ants.from_numpy(moving)
        start = time.perf_counter()
        result = ants.registration(fixed_image, moving_image, type_of_transform,
                                   outprefix=os.path.join(workdir, 'reg_'))
        seconds = time.perf_counter() - start
        composed = ants.apply_transforms(fixed_image, moving_image, result['fwdtransforms'],
                                         compose=os.path.join(workdir, 'composed_'))
        flow = ants.image_read(composed).numpy().astype(np.float32)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if flow.shape != fixed.shape + (3,):
        raise RuntimeError('ANTs returned a field of shape {}, expected {}'.format(flow.shape, fixed.shape + (3,)))
    return flow, seconds


def register(fixed, moving):
    """Dense pull field float32 [X, Y, Z, 3] (voxels) taking ``moving`` onto ``fixed`` (ANTs SyN)."""
    return register_timed(fixed, moving)[0]
