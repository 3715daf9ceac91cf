"""Compiled trilinear warp op (C++ TensorFlow custom op, CPU, intra-op thread pool).

``warp_op(image, flow, padding)`` has exactly the contract of
``network.spatial_transformer.warp_tf``: image [B, X, Y, Z, C] float32, flow [B, X, Y, Z, 3]
float32 in voxels, output(p) = image(p + flow(p)) trilinear, padding 'border' or 'zeros'.
Its gradients w.r.t. image and flow are compiled ops too, registered for graph mode
(``tf.gradients``). Second derivatives are not defined.

The library is built from ``warp_op.cc`` on first use (see ``network.ops.build``) and cached.
If it cannot be built or loaded, ``load_warp_op()`` prints one warning per process and
returns None, so ``network.spatial_transformer.warp`` falls back to the pure-TF warp; with
``required=True`` or env ``LDR_REQUIRE_WARP_OP=1`` it raises RuntimeError instead.
"""
import os
import sys
import threading

from errors import ConfigError

from network.tfv1 import tf

PADDINGS = ('border', 'zeros')

_library = None  # the loaded op module, once loaded
_failure = None  # one-line reason, once loading failed (not retried in this process)
_warned = False
_lock = threading.Lock()  # one loader at a time (the gradient may be registered only once)


def _register_gradient(library):
    """Make tf.gradients use the compiled gradient ops for LdrWarp."""

    @tf.RegisterGradient('LdrWarp')
    def _warp_grad(op, grad):
        image, flow = op.inputs
        padding = op.get_attr('padding')
        if isinstance(padding, bytes):
            padding = padding.decode()
        return [library.ldr_warp_grad_image(image, flow, grad, padding=padding),
                library.ldr_warp_grad_flow(image, flow, grad, padding=padding)]


def load_warp_op(required=False):
    """The loaded op library, building it if needed; None when it is unavailable.

    Unavailable means no compiler, a failed build or a failed load. Then a single warning
    line is printed per process, unless ``required`` or env ``LDR_REQUIRE_WARP_OP=1``, in
    which case RuntimeError is raised. The result is cached for the process.
    """
    global _library, _failure, _warned
    from . import build  # here, not at the top: ``python -m network.ops.build`` runs it as __main__
    with _lock:
        if _library is None and _failure is None:
            try:
                library = tf.load_op_library(build.build())
                _register_gradient(library)
                _library = library
            except (build.BuildError, OSError, tf.errors.OpError) as error:
                _failure = ' '.join(str(error).split())
        if _library is not None:
            return _library
        if required or os.environ.get('LDR_REQUIRE_WARP_OP', '0') not in ('', '0'):
            raise RuntimeError('the compiled warp op is unavailable: {}'.format(_failure))
        if not _warned:
            print('warning: compiled warp op unavailable ({}); using the slower pure-TF warp'
                  .format(_failure), file=sys.stderr)
            _warned = True
        return None


def warp_op(image, flow, padding='border'):
    """Warp ``image`` [B,X,Y,Z,C] by ``flow`` [B,X,Y,Z,3] (voxels) with the compiled op.

    Returns [B,X,Y,Z,C] float32, image(p + flow(p)) trilinear. Raises RuntimeError if the
    op is unavailable.
    """
    if padding not in PADDINGS:
        raise ConfigError('unknown warp padding {!r} (choose from {})'.format(padding, ', '.join(PADDINGS)))
    library = load_warp_op(required=True)
    image = tf.convert_to_tensor(image, dtype=tf.float32)
    flow = tf.convert_to_tensor(flow, dtype=tf.float32)
    return library.ldr_warp(image, flow, padding=padding)
