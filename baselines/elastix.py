"""Elastix B-spline (itk-elastix) as a baseline: ``register(fixed, moving, affine=False) -> flow``.

Parameter maps: elastix's default 'bspline' map, optionally preceded by its default 'affine'
map. ITK images made from NumPy arrays reverse the axis order (array [X, Y, Z] becomes an
image whose index is (Z, Y, X)), so the displacement vectors transformix returns carry their
components in reversed order; they are flipped back here. With unit spacing and zero origin a
physical displacement equals one in voxels, and transformix's field maps fixed points into the
moving image: a pull field like ours. The thread count is not passed to elastix (itk-elastix
0.25 crashes with number_of_threads=2); ITK's global default (2 here) applies. transformix
writes deformationField.nii into its output directory (the current one by default): it is given
a private temporary directory, removed afterwards.
"""
import shutil
import tempfile
import time

import numpy as np


def register_timed(fixed, moving, affine=False, max_iterations=None):
    """Register ``moving`` to ``fixed`` (float [X, Y, Z], 0..255, unit spacing).

    affine: run the default 'affine' map before the 'bspline' one; max_iterations: override
    the maps' MaximumNumberOfIterations (256 per resolution by default; tests use fewer).
    Returns (flow float32 [X, Y, Z, 3] in voxels, our pull convention; seconds of the
    elastix registration call alone).
    """
    import itk
    fixed = np.ascontiguousarray(fixed, np.float32)
    moving = np.ascontiguousarray(moving, np.float32)
    if fixed.shape != moving.shape or fixed.ndim != 3:
        raise ValueError('fixed and moving must be 3-D arrays of one shape, got {} and {}'.format(
            fixed.shape, moving.shape))
    fixed_image, moving_image = itk.GetImageFromArray(fixed), itk.GetImageFromArray(moving)
    parameters = itk.ParameterObject.New()
    for name in (('affine', 'bspline') if affine else ('bspline',)):
        parameter_map = parameters.GetDefaultParameterMap(name)
        if max_iterations is not None:
            parameter_map['MaximumNumberOfIterations'] = [str(int(max_iterations))]
        parameters.AddParameterMap(parameter_map)
    start = time.perf_counter()
    _, transform = itk.elastix_registration_method(fixed_image, moving_image, parameter_object=parameters,
                                                   log_to_console=False)
    seconds = time.perf_counter() - start
    workdir = tempfile.mkdtemp(prefix='ldr_elastix_')
    try:
        field = itk.transformix_deformation_field(moving_image, transform, output_directory=workdir)
        flow = np.array(itk.GetArrayFromImage(field), np.float32)[..., ::-1]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if flow.shape != fixed.shape + (3,):
        raise RuntimeError('elastix returned a field of shape {}, expected {}'.format(flow.shape, fixed.shape + (3,)))
    return np.ascontiguousarray(flow), seconds


def register(fixed, moving, affine=False, max_iterations=None):
    """Dense pull field float32 [X, Y, Z, 3] (voxels) taking ``moving`` onto ``fixed`` (elastix)."""
    return register_timed(fixed, moving, affine, max_iterations)[0]
