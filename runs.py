"""A train.py run directory: its configuration and its checkpoints, owned here.

    weights/<run>/
        args.json                 RunConfig: the settings the run was started with
        model-<step>.index/.data  TensorFlow checkpoints of the network (and optimiser state)
        model-<step>.complete     written after its checkpoint; only marked checkpoints count

Everything that reads a run (train.py resuming it or loading it as a teacher, eval.py,
predict.py, the Python API, the benchmarks) goes through ``Run`` / ``RunConfig``, so
settings, defaults and the cascade's constructor arguments are decided here once. The module
imports no TensorFlow; the functions that build or restore a graph import it when called.

args.json carries ``"schema": SCHEMA``. Files without it (schema 1: every run before the key
existed) load the same way: the settings are unchanged, only the key is new.
"""
import json
import os
import re

import numpy as np

from cli import parse_kwargs, write_atomic, write_json
from errors import UserError

SCHEMA = 2
CONFIG_FILE = 'args.json'
# Architecture settings with their defaults: a resumed run takes its own and refuses others.
ARCH_DEFAULTS = {'base_network': 'VTN', 'n_cascades': 1, 'rep': 1, 'net_args': '', 'image_size': None}
DEFAULT_DATASET = 'datasets/liver.json'
# Settings of one invocation, never taken over when a run is resumed.
NOT_RESUMED = ('checkpoint', 'init_from', 'gpu', 'debug', 'output', 'name', 'clear_steps', 'finetune',
               'preprocessing', 'schema')
REQUIRED = ('base_network', 'n_cascades', 'image_size')
CHECKPOINT_RE = re.compile(r'model-(\d+)\.index$')
COMPLETE_SUFFIX = '.complete'


class DamagedCheckpoint(UserError):
    """A checkpoint whose files exist but cannot be read (truncated, corrupted)."""


def cubic_sizes(value, what):
    """An image size given as N, [N] or [X, Y, Z] -> [X, Y, Z] (ints >= 1); UserError naming ``what``."""
    size = [value] if isinstance(value, int) else list(value or [])
    size = size * 3 if len(size) == 1 else size
    if len(size) != 3 or not all(isinstance(n, int) and n >= 1 for n in size):
        raise UserError('{} {}: an image size is one or three positive integers'.format(what, value))
    return size


class RunConfig:
    """The settings of one training run: train.py's flags plus what it derived (the image size,
    the seed it drew, the dataset's preprocessing record).

    ``settings`` is the plain dict stored as args.json; attributes read the keys every reader
    needs, with their defaults stated once (ARCH_DEFAULTS).
    """

    def __init__(self, settings):
        self.settings = dict(settings)
        self.settings['schema'] = SCHEMA

    @classmethod
    def from_flags(cls, args):
        """From train.py's argparse namespace (after its defaults and derived values are set)."""
        return cls(vars(args))

    @classmethod
    def load(cls, run_dir):
        """The args.json of a run directory; UserError if it is missing or is not one."""
        path = os.path.join(run_dir, CONFIG_FILE)
        try:
            with open(path) as f:
                settings = json.load(f)
        except FileNotFoundError:
            raise UserError('{} is missing: not a run directory of train.py'.format(path))
        except json.JSONDecodeError as e:
            raise UserError('{} is not valid JSON ({})'.format(path, e))
        except OSError as e:
            raise UserError('cannot read {}: {}'.format(path, e.strerror or e))
        if not isinstance(settings, dict):
            raise UserError('{} holds a {}, not the settings of a train.py run'.format(path, type(settings).__name__))
        missing = [k for k in REQUIRED if k not in settings]
        if missing:
            raise UserError('{} lacks {}: not the args.json of a train.py run'.format(path, ', '.join(missing)))
        if settings.get('schema', 1) > SCHEMA:
            raise UserError('{} has schema {}, newer than this code reads ({}): update the project'.format(
                path, settings['schema'], SCHEMA))
        config = cls(settings)
        config.image_size = cubic_sizes(settings['image_size'], '{}: image_size'.format(path))
        return config

    def save(self, run_dir):
        write_json(os.path.join(run_dir, CONFIG_FILE), self.settings)

    def get(self, key, default=None):
        value = self.settings.get(key)
        return ARCH_DEFAULTS.get(key, default) if value is None else value

    @property
    def base_network(self):
        return self.get('base_network')

    @property
    def n_cascades(self):
        return int(self.get('n_cascades'))

    @property
    def rep(self):
        return int(self.get('rep'))

    @property
    def image_size(self):
        return self.settings['image_size']

    @image_size.setter
    def image_size(self, value):
        self.settings['image_size'] = value

    @property
    def net_options(self):
        """--net_args as a dict."""
        return parse_kwargs(self.get('net_args'), "the run's net_args")

    @property
    def preprocessing(self):
        """The preprocessing record of the training data (data_util.prepare), None for older runs."""
        return self.settings.get('preprocessing')

    @property
    def is_aldk(self):
        return bool(self.settings.get('aldk'))

    def cascade_args(self, rep=None, extra=None):
        """network.cascade.RecursiveCascade's constructor arguments: the run's base network,
        cascades, repeats (``rep`` if given) and net_args, ``extra`` overriding the latter."""
        from network.cascade import make_net_args
        options = self.net_options
        options.update(extra or {})
        return make_net_args(self.base_network, self.n_cascades, rep or self.rep, options)

    def describe(self):
        """The architecture keys, for records and exports."""
        return {'base_network': self.base_network, 'n_cascades': self.n_cascades, 'rep': self.rep,
                'net_args': self.get('net_args')}

    def check_same_architecture(self, args, keys=tuple(ARCH_DEFAULTS)):
        """Resuming or fine-tuning: each architecture flag of ``keys`` that ``args`` gives (not
        None) must equal the run's, compared by value (``--image_size 64`` equals [64, 64, 64];
        net_args as parsed dicts). UserError naming the first that differs."""
        for key in keys:
            given = getattr(args, key, None)
            if given is None or given == '':
                continue
            if key == 'image_size':
                same = cubic_sizes(given, '--image_size') == self.image_size
            elif key == 'net_args':
                same = parse_kwargs(given, '--net_args') == self.net_options
            else:
                same = given == self.get(key)
            if not same:
                raise UserError('--{} {} contradicts the checkpoint run ({}); architecture flags must match'.format(
                    key, given, self.get(key)))

    def apply_architecture(self, args, keys=tuple(ARCH_DEFAULTS)):
        """Set ``args``' architecture flags of ``keys`` to the run's, after checking that those
        given agree (`check_same_architecture`)."""
        self.check_same_architecture(args, keys)
        for key in keys:
            setattr(args, key, self.get(key))

    def apply_settings(self, args, given):
        """Resuming: every stored setting that the command line does not give again (the
        destinations in ``given``) comes back, except those of one invocation (NOT_RESUMED)."""
        for key, value in self.settings.items():
            if key not in given and key not in NOT_RESUMED and hasattr(args, key):
                setattr(args, key, value)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(saver, sess, run_dir, step):
    """Save ``model-<step>`` and then, atomically, its ``.complete`` marker.

    A kill or a full disk during the save leaves a checkpoint without a marker, which
    ``list_checkpoints`` ignores, so the previous one stays the newest usable checkpoint.
    Returns the checkpoint prefix.
    """
    prefix = saver.save(sess, os.path.join(run_dir, 'model'), global_step=step, write_meta_graph=False)
    write_atomic(prefix + COMPLETE_SUFFIX, '{}\n'.format(step))
    for name in os.listdir(run_dir):
        stale = name.endswith(COMPLETE_SUFFIX) and not os.path.exists(
            os.path.join(run_dir, name[:-len(COMPLETE_SUFFIX)] + '.index'))
        if stale:
            os.remove(os.path.join(run_dir, name))
    return prefix


def list_checkpoints(directory):
    """{step: prefix} of the complete checkpoints in a run directory.

    Where any checkpoint carries a ``.complete`` marker (ours do), only marked ones count;
    otherwise (e.g. a checkpoint of the original code) an index plus a data file suffice.
    """
    names = set(os.listdir(directory))
    found = {}
    for name in names:
        m = CHECKPOINT_RE.match(name)
        if m:
            base = name[:-len('.index')]
            if any(f.startswith(base + '.data-') for f in names):
                found[int(m.group(1))] = base
    marked = {step: base for step, base in found.items() if base + COMPLETE_SUFFIX in names}
    return {step: os.path.join(directory, base) for step, base in (marked or found).items()}


def resolve_checkpoint(spec):
    """'DIR', 'DIR:STEP' or a checkpoint prefix -> (run_dir, checkpoint_prefix, step).

    A bare name is looked up under weights/. DIR picks the newest complete checkpoint; STEP the
    one closest to STEP (as the original's eval.py).
    """
    step = None
    m = re.match(r'^(.*):(\d+)$', spec)
    if m:
        spec, step = m.group(1), int(m.group(2))
    if not os.path.exists(spec) and os.path.isdir(os.path.join('weights', spec)):
        spec = os.path.join('weights', spec)
    if os.path.isdir(spec):
        found = list_checkpoints(spec)
        if not found:
            raise UserError('no checkpoint (model-N.index + data) in {}'.format(spec))
        best = max(found) if step is None else min(found, key=lambda s: abs(s - step))
        return spec, found[best], best
    if os.path.exists(spec + '.index'):
        m = re.search(r'model-(\d+)$', spec)
        return os.path.dirname(spec) or '.', spec, int(m.group(1)) if m else None
    raise UserError('checkpoint not found: {}'.format(spec))


class Run:
    """A resolved checkpoint of a run: ``directory``, ``prefix``, ``step`` and ``config``.

    Run('DIR' | 'DIR:STEP' | prefix); UserError if the checkpoint or its args.json is missing."""

    def __init__(self, spec):
        self.directory, self.prefix, self.step = resolve_checkpoint(spec)
        self.config = RunConfig.load(self.directory)

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.directory))


def fallbacks(spec, run):
    """[(prefix, step)] to try, newest first: for a run directory given alone, its complete
    checkpoints from the chosen one down (a damaged newest one falls back to the one before);
    for DIR:STEP or a prefix, that checkpoint only."""
    if not os.path.isdir(spec) and not os.path.isdir(os.path.join('weights', spec)):
        return [(run.prefix, run.step)]
    found = list_checkpoints(run.directory)
    return [(found[s], s) for s in sorted(found, reverse=True) if run.step is None or s <= run.step]


def op_error_reason(error):
    """The line of a TensorFlow OpError's message that says what went wrong (not where)."""
    lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.endswith(':') and not line.startswith(('File ', 'Node:', '[['))
               and not line.startswith('Detected at node')]
    return reasons[0] if reasons else (lines[0] if lines else 'no detail')


def restore_variables(sess, prefix, variables):
    """Restore ``variables`` from checkpoint ``prefix``; UserError naming it if they do not fit,
    DamagedCheckpoint if its files cannot be read."""
    from network.tfv1 import tf
    try:
        stored = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as e:
        raise UserError('cannot read checkpoint {}: {}'.format(prefix, str(e).splitlines()[0]))
    bad = [v.op.name for v in variables if stored.get(v.op.name) != v.shape.as_list()]
    if bad:
        raise UserError('checkpoint {} does not fit this network: {} of {} variables missing or of another shape '
                        '(e.g. {})'.format(prefix, len(bad), len(variables), bad[0]))
    try:
        tf.train.Saver(variables).restore(sess, prefix)
    except tf.errors.OpError as e:
        raise DamagedCheckpoint('checkpoint {} is damaged: its files {}.index / {}.data-* cannot be read ({}: {})'.format(
            prefix, os.path.basename(prefix), os.path.basename(prefix), type(e).__name__, op_error_reason(e)))


def restore_first(sess, variables, candidates, warn):
    """Restore ``variables`` from the first of ``candidates`` [(prefix, step)] that restores and
    return it; a damaged one is skipped with ``warn(message)``; the last one's error is raised."""
    for index, (prefix, step) in enumerate(candidates):
        try:
            restore_variables(sess, prefix, variables)
            return prefix, step
        except DamagedCheckpoint as e:
            if index == len(candidates) - 1:
                raise
            warn('{}; trying the one before'.format(e))


def restore_matching(sess, prefix, variables):
    """Initialise ``variables`` from checkpoint ``prefix`` wherever a stored variable has the same
    name and shape, or the same name and a kernel grown by integer factors along its three spatial
    axes (a run at another image size: the affine heads, whose 'valid' kernels span the whole
    feature map). A grown kernel is the stored one repeated over each factor-sized block and divided
    by the block's size, so that features constant over each block (the coarse map upsampled) give
    the same output. Returns (names resampled so, names left as initialised); UserError if nothing
    matches."""
    from network.tfv1 import tf
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise UserError('cannot read checkpoint {}: {}'.format(prefix, str(e).splitlines()[0]))
    stored = reader.get_variable_to_shape_map()
    matching = [v for v in variables if stored.get(v.op.name) == v.shape.as_list()]
    grown = {v: factors for v in variables if v not in matching
             for factors in [kernel_growth(stored.get(v.op.name), v.shape.as_list())] if factors}
    if not matching:
        raise UserError('checkpoint {} has none of this network\'s variables (another base network?)'.format(prefix))
    tf.train.Saver(matching).restore(sess, prefix)
    for v, factors in grown.items():
        kernel = reader.get_tensor(v.op.name)
        for axis, factor in enumerate(factors):
            kernel = np.repeat(kernel, factor, axis=axis)
        v.load(kernel / np.prod(factors), sess)
    return [v.op.name for v in grown], [v.op.name for v in variables if v not in matching and v not in grown]


def kernel_growth(old, new):
    """(fx, fy, fz) when conv kernel shape ``new`` is ``old`` with its three spatial sizes multiplied
    by those integers (channels equal), else None."""
    if old is None or len(old) != 5 or len(new) != 5 or old[3:] != new[3:] or old == new:
        return None
    if any(n % o for o, n in zip(old[:3], new[:3])):
        return None
    return tuple(n // o for o, n in zip(old[:3], new[:3]))


def load_framework(spec, image_size=None, class_values=None, rep=None, extra=None, threads=None):
    """An evaluation Framework of a run's checkpoint, restored in a tf.Graph of its own (so a
    process may hold several models). It holds the registration network only (no optimiser,
    critic or teacher).

    spec: 'DIR', 'DIR:STEP' or a prefix; image_size: [X, Y, Z] (default the run's); extra:
    net_args overriding the run's (e.g. flow_multiplier); threads: the session's intra- and
    inter-op pool sizes (None = TensorFlow's choice). Returns (session, framework, Run).
    """
    from network.framework import Framework, session_config
    from network.tfv1 import tf
    run = Run(spec)
    net_args = run.config.cascade_args(rep, extra)
    graph = tf.Graph()
    with graph.as_default():
        framework = Framework(net_args, image_size or run.config.image_size, class_values, validation=True)
        sess = tf.Session(graph=graph, config=session_config(framework.devices, threads))
        restore_variables(sess, run.prefix, framework.net.variables)
    return sess, framework, run
