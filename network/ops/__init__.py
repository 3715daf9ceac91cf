"""Compiled warp op (C++ TensorFlow custom op); see issue 3. Not built yet."""


def load_warp_op(required=False):
    """The loaded op library, or None when it is unavailable (error if ``required``)."""
    if required:
        raise RuntimeError('the compiled warp op is not available in this build')
    return None


def warp_op(image, flow, padding='border'):
    raise RuntimeError('the compiled warp op is not available in this build')
