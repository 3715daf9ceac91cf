"""Classical registration baselines on the project's pairs, in the project's flow convention.

Each method registers a MOVING volume to a FIXED one, both float arrays [X, Y, Z] of 0..255
with unit spacing, and returns a pull field ``flow`` float32 [X, Y, Z, 3] in voxels with
``warped(p) = moving(p + flow(p))``, channel k along array axis k (SPEC section 2).

    identity                no registration (the zero flow): the overlap before registration
    ants_syn                ANTs SyN (antspyx, type_of_transform 'SyN': affine + SyN, defaults)
    ants_syncc              ANTs SyNCC (antspyx 'SyNCC': rigid + affine + SyN with the cross-correlation
                            metric, the slower setting users pick for accuracy)
    elastix_bspline         elastix with its default 'bspline' parameter map alone
    elastix_affine_bspline  elastix default 'affine' map, then the default 'bspline' map

The packages are optional extras (requirements-baselines.txt); ``missing(method)`` tells
whether one can run here (identity needs none). Both libraries run their registration on
``THREADS`` ITK threads (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, set before their import).
"""
import importlib
import os

THREADS = 2
os.environ.setdefault('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', str(THREADS))

METHODS = {
    'identity': {'module': 'identity', 'package': None, 'label': 'No registration (identity)', 'options': {}},
    'ants_syn': {'module': 'ants', 'package': 'antspyx', 'label': 'ANTs SyN', 'options': {}},
    'ants_syncc': {'module': 'ants', 'package': 'antspyx', 'label': 'ANTs SyNCC',
                   'options': {'type_of_transform': 'SyNCC'}},
    'elastix_bspline': {'module': 'elastix', 'package': 'itk-elastix', 'label': 'Elastix B-spline',
                        'options': {'affine': False}},
    'elastix_affine_bspline': {'module': 'elastix', 'package': 'itk-elastix',
                               'label': 'Elastix affine + B-spline', 'options': {'affine': True}},
}
IMPORT_NAMES = {'antspyx': 'ants', 'itk-elastix': 'itk'}


def installed(package):
    """Whether a baseline package is installed (its distribution and its module are found; nothing imported)."""
    from importlib import metadata, util
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return util.find_spec(IMPORT_NAMES[package]) is not None


def missing(method):
    """None if ``method`` can run here, else a one-line reason (e.g. 'antspyx not installed ...')."""
    if method not in METHODS:
        raise ValueError('unknown baseline {!r} (choose from {})'.format(method, ', '.join(METHODS)))
    package = METHODS[method]['package']
    if package is not None and not installed(package):
        return '{} not installed (pip install -r requirements-baselines.txt)'.format(package)
    return None


def registration_function(method):
    """``f(fixed, moving) -> (flow, seconds)`` of a baseline; seconds = the registration call only."""
    spec = METHODS[method]
    module = importlib.import_module('baselines.' + spec['module'])
    options = spec['options']
    return lambda fixed, moving: module.register_timed(fixed, moving, **options)


def version(method):
    """Installed version of the method's package, or None."""
    from importlib import metadata
    if METHODS[method]['package'] is None:
        return None
    try:
        return metadata.version(METHODS[method]['package'])
    except metadata.PackageNotFoundError:
        return None
