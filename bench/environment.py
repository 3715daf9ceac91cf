"""The settings line every benchmark table starts with: what was measured, and on what."""
import os
import platform


def environment(threads, size):
    """'<size>^3, batch 1, <threads> threads, oneDNN on/off, warp op/tf, TensorFlow x, Python y, CPU (n CPUs)'.

    Imports TensorFlow (the caller measures it anyway)."""
    from network import spatial_transformer
    from network.tfv1 import tf
    return ('{}^3, batch 1, {} threads, oneDNN {}, warp {}, TensorFlow {}, Python {}, {} ({} CPUs)'.format(
        size, threads, 'on' if os.environ.get('TF_ENABLE_ONEDNN_OPTS') == '1' else 'off',
        spatial_transformer.warp_impl(), tf.__version__, platform.python_version(), cpu_name(), os.cpu_count()))


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'
