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
import functools
import importlib
import os
import shutil
import tempfile

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


def target(method):
    """(module name, options) of a baseline's ``register_timed(fixed, moving, **options)``."""
    spec = METHODS[method]
    return 'baselines.' + spec['module'], dict(spec['options'])


def registration_function(method):
    """``f(fixed, moving) -> (flow, seconds)`` of a baseline in this process; seconds = the
    registration call only."""
    return functools.partial(_register, *target(method))


def _register(module, options, fixed, moving):
    return importlib.import_module(module).register_timed(fixed, moving, **options)


def _enter_worker(tmp):
    tempfile.tempdir = tmp
    os.environ['TMPDIR'] = tmp


class Isolated:
    """Registrations in a spawned child process, as a context manager:
    ``with Isolated(*target(method)) as register: flow, seconds = register(fixed, moving)``.

    Ctrl-C or SIGTERM then stops at once (the child is killed on the way out) instead of when
    the library's call returns (ANTs SyNCC: ~20 minutes per 128^3 pair), and every file the
    library writes, its own leftovers too, goes into a temporary directory removed on exit.
    """

    def __init__(self, module, options):
        self.module, self.options = module, options

    def __enter__(self):
        import multiprocessing
        self.tmp = tempfile.mkdtemp(prefix='ldr_baseline_')
        self.pool = multiprocessing.get_context('spawn').Pool(1, initializer=_enter_worker, initargs=(self.tmp,))
        return self

    def __call__(self, fixed, moving):
        return self.pool.apply(_register, (self.module, self.options, fixed, moving))

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()
        shutil.rmtree(self.tmp, ignore_errors=True)


def version(method):
    """Installed version of the method's package, or None."""
    from importlib import metadata
    if METHODS[method]['package'] is None:
        return None
    try:
        return metadata.version(METHODS[method]['package'])
    except metadata.PackageNotFoundError:
        return None
