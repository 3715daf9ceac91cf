"""Compile ``warp_op.cc`` into a TensorFlow op library, cached under ``network/ops/_build/``.

Usage: ``python -m network.ops.build [--force]`` (``network.ops.load_warp_op`` also calls
``build()`` on first use). The library's file name holds a hash of everything that
changes the binary: the TensorFlow version, the sources (``warp_op.cc`` and the kernel
headers beside it, which it includes), the compiler and its flags (-O3, plus -mavx2 -mfma
when the CPU has them). A cached library is reused without compiling. Concurrent builds
are safe: builders serialise on a file lock (``_build/build.lock``), and the library is
written to a temporary file and renamed into place, so no process ever loads a
half-written file.
"""
import argparse
import fcntl
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from network.tfv1 import tf

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, 'warp_op.cc')
BUILD_DIR = os.path.join(HERE, '_build')

BASE_FLAGS = ['-std=c++17', '-shared', '-fPIC', '-O3']


class BuildError(RuntimeError):
    """The op library could not be built (no compiler, or the compiler failed)."""


def compiler():
    """Path of the C++ compiler ($CXX, else g++); BuildError if there is none."""
    name = os.environ.get('CXX', 'g++')
    path = shutil.which(name)
    if path is None:
        raise BuildError('no C++ compiler found ({!r} is not on PATH)'.format(name))
    return path


def cpu_flags():
    """['-mavx2', '-mfma'] if this x86-64 CPU reports AVX2 and FMA (Linux), else [].

    No -march=native: the flags depend only on these two features, and being part of the
    cache key, a machine without them never picks up a library built with them.
    """
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return []
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return []
    return ['-mavx2', '-mfma'] if {'avx2', 'fma'} <= set(flags) else []


def command(output, extra_flags=(), portable=False):
    """The full compiler command line that writes the library to ``output``.

    ``extra_flags`` (e.g. a sanitizer's) go after the optimisation and CPU flags; ``portable``
    leaves out the CPU flags, so the library holds only the code that builds without AVX2.
    """
    return ([compiler()] + BASE_FLAGS + ([] if portable else cpu_flags()) + list(extra_flags)
            + tf.sysconfig.get_compile_flags() + [SOURCE, '-o', output]
            + tf.sysconfig.get_link_flags())


def sources():
    """The files the library is compiled from: SOURCE and the kernel headers (``*.h``) beside
    it, which it includes."""
    return [SOURCE] + sorted(glob.glob(os.path.join(os.path.dirname(SOURCE), '*.h')))


def library_path():
    """Where the library for the current TensorFlow, sources, compiler and flags lives."""
    key = hashlib.sha256()
    key.update(tf.VERSION.encode())
    for path in sources():
        key.update(os.path.basename(path).encode() + b'\0')
        with open(path, 'rb') as f:
            key.update(f.read())
    key.update('\0'.join(command('OUT')).encode())
    return os.path.join(BUILD_DIR, 'warp_op_{}.so'.format(key.hexdigest()[:16]))


def _compile(output):
    """Run the compiler; BuildError with the compiler's first error line on failure."""
    result = subprocess.run(command(output), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    if result.returncode != 0:
        lines = result.stdout.strip().splitlines()
        errors = [line for line in lines if 'error' in line] or lines[-1:]
        reason = errors[0] if errors else 'exit status {}'.format(result.returncode)
        raise BuildError('compiling {} failed: {}'.format(os.path.basename(SOURCE), reason))


def build(force=False, verbose=False):
    """Path of the compiled library, compiling it only if it is not cached (or ``force``)."""
    path = library_path()
    if os.path.exists(path) and not force:
        return path
    os.makedirs(BUILD_DIR, exist_ok=True)
    with open(os.path.join(BUILD_DIR, 'build.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another process may have finished the same build while this one waited.
        if os.path.exists(path) and not force:
            return path
        print('network.ops: compiling the warp op (one-off, ~30 s) -> {}'.format(path),
              file=sys.stderr)
        if verbose:
            print(' '.join(command(path)), file=sys.stderr)
        fd, tmp = tempfile.mkstemp(suffix='.so.tmp', dir=BUILD_DIR)
        os.close(fd)
        try:
            _compile(tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--force', action='store_true', help='rebuild even if cached')
    parser.add_argument('-v', '--verbose', action='store_true', help='print the compiler command')
    args = parser.parse_args()
    try:
        print(build(force=args.force, verbose=args.verbose))
    except BuildError as error:
        sys.exit('error: {}'.format(error))


if __name__ == '__main__':
    main()
