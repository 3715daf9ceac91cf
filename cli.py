"""Shared command-line plumbing of train.py, eval.py and predict.py.

Errors a user can cause end in one line ``error: ...`` on stderr and exit status 2; outputs are
written atomically (temp file + rename) so an interrupted run never leaves half a file.
"""
import argparse
import ast
import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import tempfile

EXIT_USAGE = 2
# network.subnets.BASE_NETWORKS' keys, listed here so that argument parsing needs no TensorFlow.
BASE_NETWORK_NAMES = ('VTN', 'VoxelMorph', 'LDR', 'LDROriginal')


def parse_devices(flag):
    """'-1' -> ['/cpu:0']; 'cpu:N' -> N logical CPU towers; '0,1' -> GPU towers. ValueError if malformed."""
    flag = str(flag).strip()
    if flag == '-1':
        return ['/cpu:0']
    if flag.startswith('cpu:'):
        n = flag[4:]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError('bad -g {!r}: expected cpu:N with N >= 1'.format(flag))
        return ['/cpu:%d' % i for i in range(int(n))]
    ids = flag.split(',')
    if not all(i.strip().isdigit() for i in ids):
        raise ConfigError('bad -g {!r}: expected -1 (CPU), cpu:N, or GPU ids like 0,1'.format(flag))
    return ['/gpu:%d' % i for i in range(len(ids))]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2) instead of usage + message."""

    def error(self, message):
        fail(message)


def positive_int(text):
    """argparse type of counts (--batch, --round, ...): an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError('must be a positive integer, got {}'.format(text))
    return value


def positive_float(text):
    """argparse type of amounts (--epochs): a finite float > 0."""
    value = float(text)
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError('must be a positive finite number, got {}'.format(text))
    return value


from errors import ConfigError, UserError  # noqa: E402  (re-exported: the scripts raise cli.UserError)


def fail(message):
    """Print ``error: message`` (one line) and exit with status 2."""
    print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _terminate(signum, frame):
    raise KeyboardInterrupt('terminated')


def run(main):
    """Call ``main()``; turn user errors (errors.UserError and its subclasses) into one line
    (exit 2); any other exception is a bug and shows its traceback. SIGTERM is taken like
    Ctrl-C, so that every temporary file and staging directory is removed."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main()
    except UserError as e:
        fail(e)
    except KeyboardInterrupt:
        fail('interrupted')


class StopRequests:
    """Ctrl-C and SIGTERM noted instead of raised while the block runs (``requested`` holds the
    signal's name), so that a loop can stop at a safe point; a second signal stops at once."""

    def __init__(self):
        self.requested = None

    def _note(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(self.requested)
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def made_directory(path):
    """Create the directory ``path`` if missing for the block; if this created it and the block
    leaves it empty (a refused or failed run), remove it again."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError('cannot create the directory {}: {}'.format(path, e.strerror or e))
    try:
        yield path
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)


@contextlib.contextmanager
def exclusive_output(path, what='output'):
    """Own ``path`` (a run directory, an output file or directory) while the block runs: an
    exclusive lock on a hidden file beside it, ``.<name>.lock``, holding this process's id. A
    second process claiming the same path gets a UserError naming the owner's pid. The kernel
    releases the lock when its process dies however it dies, so a stale file does not block."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError('{}: parent directory {} does not exist'.format(path, parent))
    lock_path = os.path.join(parent, '.{}.lock'.format(os.path.basename(path)))
    while True:
        try:
            handle = open(lock_path, 'a+')
        except OSError as e:
            raise UserError('cannot claim {} {} ({}: {})'.format(what, path, lock_path, e.strerror or e))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or 'unknown'
            handle.close()
            raise UserError('{} {} is in use by another process (pid {}); wait for it or choose another'.format(
                what, path, owner))
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break       # else the owner removed the file between our open and our lock: again
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write('{}\n'.format(os.getpid()))
        handle.flush()
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)
        handle.close()


def progress_write(message):
    """A line on stderr that does not tear a progress bar drawn there."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


class _LineStream:
    """A text stream for tqdm that writes each refresh of the bar as a line of its own, so that
    a log file or a pipe gets readable lines instead of carriage returns piling up on one."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace('\r', '').rstrip()
        if text:
            self.stream.write(text + '\n')

    def flush(self):
        self.stream.flush()


def progress(total, desc, unit, initial=0, enabled=True, log_interval=30.0):
    """A tqdm progress bar on stderr, redrawn in place on a terminal. Elsewhere (a log file, a
    pipe) it writes plain lines: none for work shorter than ``log_interval`` seconds (so a
    quick job or a one-line error stays clean), else one every ``log_interval`` seconds and
    one at the end."""
    from tqdm import tqdm
    stream = sys.stderr
    if getattr(stream, 'isatty', lambda: False)():
        output = {'file': stream}
    else:
        output = {'file': _LineStream(stream), 'mininterval': log_interval, 'delay': log_interval}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, **output)


def add_refine_flags(parser):
    """--refine N and its settings (network/refine.py), shared by eval.py and predict.py."""
    from network.refine_config import RefineSettings
    defaults = RefineSettings()
    g = parser.add_argument_group('instance optimisation after the network (network/refine.py)')
    g.add_argument('--refine', type=int, default=0, metavar='N',
                   help='N Adam iterations on each pair after the network (default 0: the network alone)')
    g.add_argument('--refine_factor', type=int, default=defaults.factor,
                   help='the refined field and the loss live on a grid this many times coarser (power of 2; '
                        'default %(default)s)')
    g.add_argument('--refine_window', type=int, default=defaults.window,
                   help='LNCC window, voxels of that grid (odd; default %(default)s)')
    g.add_argument('--refine_weight', type=float, default=defaults.weight,
                   help='weight of the diffusion regulariser (default %(default)s)')
    g.add_argument('--refine_lr', type=float, default=defaults.learning_rate, help='Adam learning rate (default %(default)s)')
    g.add_argument('--diffeomorphic', action='store_true',
                   help='refine a stationary velocity integrated by scaling and squaring (folding-free)')
    g.add_argument('--squarings', type=int, default=defaults.squarings, help='scaling and squaring steps (default %(default)s)')


def refine_settings(args):
    """The network.refine.Refiner settings of parsed --refine_* flags; UserError for values that cannot work."""
    if args.refine < 0:
        raise UserError('--refine {}: a number of iterations >= 0'.format(args.refine))
    if not (math.isfinite(args.refine_weight) and args.refine_weight >= 0):
        raise UserError('--refine_weight {}: a finite weight >= 0'.format(args.refine_weight))
    if not (math.isfinite(args.refine_lr) and args.refine_lr > 0):
        raise UserError('--refine_lr {}: a positive learning rate'.format(args.refine_lr))
    if args.squarings < 0:
        raise UserError('--squarings {}: a number >= 0'.format(args.squarings))
    if args.refine_factor < 1 or args.refine_factor & (args.refine_factor - 1):
        raise UserError('--refine_factor {}: a power of 2'.format(args.refine_factor))
    if args.refine_window < 3 or args.refine_window % 2 == 0:
        raise UserError('--refine_window {}: an odd number of voxels, at least 3'.format(args.refine_window))
    return {'factor': args.refine_factor, 'window': args.refine_window, 'weight': args.refine_weight,
            'learning_rate': args.refine_lr, 'diffeomorphic': args.diffeomorphic, 'squarings': args.squarings}


def parse_kwargs(text, flag):
    """Parse ``"a=1, b='x'"`` (the original's --net_args/--data_args syntax) into a dict, safely."""
    text = (text or '').strip()
    if not text:
        return {}
    try:
        call = ast.parse('f({})'.format(text), mode='eval').body
        if call.args:
            raise ValueError('positional value')
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise UserError('cannot parse {} {!r}: expected key=value pairs of literals ({})'.format(flag, text, e))


def write_atomic(path, data, mode='w'):
    """Write ``data`` (str or bytes) to ``path`` through a temp file in the same directory + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
    except OSError as e:
        raise UserError('cannot write {}: {}'.format(path, e.strerror or e))
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        plain_permissions(tmp)
        os.replace(tmp, path)
    except OSError as e:
        os.remove(tmp) if os.path.exists(tmp) else None
        raise UserError('cannot write {}: {}'.format(path, e.strerror or e))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plain_permissions(path, directory=False):
    """Give a file made by tempfile (0600, a directory 0700) the permissions a plain open() or
    mkdir would have given it under the process's umask, so that results are not left private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, default=float) + '\n')
