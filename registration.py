"""Register images with a trained model, from Python: the library predict.py is a command line of.

    import SimpleITK as sitk
    from registration import load_model

    model = load_model()                       # the shipped brain MRI model (models/lpba40-ldr)
    model = load_model('weights/my_run')       # or a train.py run (DIR, DIR:STEP, a prefix) or an export
    result = model.register(sitk.ReadImage('fixed.nii.gz'), sitk.ReadImage('moving.nii.gz'))
    sitk.WriteImage(result.warped, 'warped.nii.gz')   # the moving image on the fixed image's grid
    result.field                               # displacement field (sitk vector image, mm, LPS)
    result.report['seconds']                   # per stage

The registration contract, stated once (all geometry in physical space, mm, LPS, as SimpleITK
reads the images):
1. both images are preprocessed on their own, from the images alone, with the preprocessing the
   model's training data went through (`data_util.images.preprocess`; recorded with the
   model); label maps never enter it;
2. the network predicts a flow [N, N, N, 3] in voxels of the FIXED preprocessed grid, sampling
   the MOVING preprocessed grid: moving_grid_position = p + flow(p);
3. the displacement field u on the fixed image's own grid, in mm:
   u(x) = G_moving(p(x) + flow(p(x))) - x, p(x) the continuous position of x on the fixed grid
   (trilinear, clamped to the grid outside it), G_moving the moving grid's voxel-to-physical map
   (`data_util.geometry.displacement_field`); fixed point x corresponds to moving point x + u(x),
   ITK's convention for DisplacementFieldTransform (as ANTs / elastix pull fields);
4. warped = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field)), linear,
   default value 0; a label map the same by nearest neighbour (`data_util.geometry.warp_labels`).

Images are sitk.Image (3-D scalar) or file paths; `image_from_array` wraps a numpy array
[X, Y, Z] with its spacing, origin and direction. Errors a caller can cause raise
cli.UserError with a one-line message.
"""
import contextlib
import dataclasses
import importlib.util
import os
import time
import typing

import numpy as np

import cli
import runs

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models', 'lpba40-ldr')
PREPROCESSING_KEYS = ('modality', 'percentiles', 'window', 'threshold', 'margin', 'field_of_view')
STAGES = ('read', 'load_model', 'preprocess', 'network', 'refine', 'resample', 'write')
RUNTIMES = ('auto', 'onnx', 'tensorflow')
OUTSIDE_WARNING = 0.05   # foreground fraction outside the model's field of view that predict.py warns of


class Stopwatch:
    """Wall-clock and process-CPU seconds per named stage; repeated stages accumulate."""

    def __init__(self):
        self.wall = {}
        self.cpu = {}

    @contextlib.contextmanager
    def stage(self, name):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def report(self):
        """{'seconds': {stage: wall}, 'cpu_seconds': {stage: cpu}} with totals, in STAGES order."""
        names = [s for s in STAGES if s in self.wall] + [s for s in self.wall if s not in STAGES]
        out = {}
        for key, table in (('seconds', self.wall), ('cpu_seconds', self.cpu)):
            out[key] = {name: round(table[name], 4) for name in names}
            out[key]['total'] = round(sum(table.values()), 4)
        return out


def cubic_size(size, what):
    """An image_size (int or [N, N, N]) -> N; UserError unless cubic (the preprocessed grid is a cube)."""
    sizes = [int(s) for s in (size if isinstance(size, (list, tuple)) else [size])]
    if len(set(sizes)) != 1:
        raise cli.UserError('{} image_size {} is not cubic; registration preprocesses to N^3 grids'.format(
            what, 'x'.join(map(str, sizes))))
    return sizes[0]


# ---------------------------------------------------------------- networks

class CheckpointNetwork:
    """A train.py checkpoint restored into an evaluation graph; ``flow(fixed, moving)``."""

    def __init__(self, checkpoint, image_size, rep=None, threads=None, tf_warp=False):
        from network import spatial_transformer
        if tf_warp:
            spatial_transformer.set_warp_impl('tf')
        self.sess, self.framework, run = runs.load_framework(checkpoint, [image_size] * 3, rep=rep, threads=threads)
        self.image_size = image_size
        self.info = dict(run.config.describe(), kind='checkpoint', source=os.path.abspath(run.prefix),
                         runtime='tensorflow', rep=rep or run.config.rep, parameters=self.framework.parameter_count,
                         warp=spatial_transformer.warp_impl(), preprocessing=run.config.preprocessing)

    def flow(self, fixed, moving):
        """fixed, moving: [N, N, N] in 0..255 -> flow [N, N, N, 3] float32, voxels of the fixed grid."""
        batch = {'voxel1': np.asarray(fixed, np.float32)[None, ..., None],
                 'voxel2': np.asarray(moving, np.float32)[None, ..., None]}
        return self.framework.register(self.sess, batch)[0]


class ExportedNetwork:
    """An export of predict.py --export (network/export.py), run by TensorFlow without the network's code."""

    def __init__(self, directory, threads=None):
        from network.export import ExportError, FrozenModel
        try:
            self.model = FrozenModel(directory, threads)
        except ExportError as e:
            raise cli.UserError(str(e))
        self.image_size = self.model.image_size
        self.info = export_info(directory, self.model.meta, 'tensorflow')

    def flow(self, fixed, moving):
        return self.model.register(fixed, moving)


class OnnxNetwork:
    """An export's model.onnx run by onnxruntime: no TensorFlow is imported (only onnxruntime
    and numpy). ``threads``: onnxruntime's intra-op threads (None = its choice); its worker
    threads sleep when idle instead of spinning (on a shared machine: faster, and less CPU)."""

    def __init__(self, directory, threads=None):
        from network.export import ExportError, read_meta
        try:
            import onnxruntime
            from onnxruntime.capi import onnxruntime_pybind11_state as state
        except ImportError as e:
            raise cli.UserError('onnxruntime cannot be imported ({}); --runtime tensorflow runs model.pb'.format(e))
        try:
            meta = read_meta(directory)
        except ExportError as e:
            raise cli.UserError(str(e))
        self.path = os.path.join(directory, meta['onnx']['file'])
        try:
            self.session = onnxruntime.InferenceSession(self.path, self.session_options(threads),
                                                        providers=['CPUExecutionProvider'])
        except (state.NoSuchFile, state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.Fail,
                state.NotImplemented, state.RuntimeException) as e:
            raise cli.UserError('{}: onnxruntime cannot load it ({})'.format(self.path, str(e).strip().splitlines()[0]))
        self.inputs, self.output = meta['inputs'], meta['output']
        self.image_size = cubic_size(meta['image_size'], 'the export\'s')
        self.info = dict(export_info(directory, meta, 'onnxruntime'), onnxruntime=onnxruntime.__version__)

    @staticmethod
    def session_options(threads=None):
        """The onnxruntime.SessionOptions of the session (see the class doc)."""
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        options.log_severity_level = 3
        return options

    def flow(self, fixed, moving):
        """fixed, moving: [N, N, N] in 0..255 -> flow [N, N, N, 3] float32, voxels of the fixed grid."""
        feed = {self.inputs['fixed']: np.asarray(fixed, np.float32)[None, ..., None],
                self.inputs['moving']: np.asarray(moving, np.float32)[None, ..., None]}
        return self.session.run([self.output], feed)[0][0]


def export_info(directory, meta, runtime):
    """The report's 'model' record of an export run by ``runtime``."""
    return {'kind': 'export', 'source': os.path.abspath(directory), 'runtime': runtime,
            'base_network': meta.get('base_network'), 'n_cascades': meta.get('n_cascades'),
            'rep': meta.get('rep'), 'parameters': meta.get('parameters'), 'warp': meta['warp'],
            'preprocessing': meta.get('preprocessing')}


def export_runtime(directory, meta, runtime):
    """Which runtime runs an export: 'onnx' or 'tensorflow'. ``runtime`` 'auto' takes ONNX when
    onnxruntime is installed and the export has its model.onnx; 'onnx' insists (UserError
    saying what is missing), 'tensorflow' never takes it."""
    if runtime == 'tensorflow':
        return runtime
    has_model = 'onnx' in meta and os.path.isfile(os.path.join(directory, meta['onnx']['file']))
    has_runtime = importlib.util.find_spec('onnxruntime') is not None
    if runtime == 'onnx' and not has_runtime:
        raise cli.UserError('the ONNX runtime needs onnxruntime: pip install onnxruntime')
    if runtime == 'onnx' and not has_model:
        raise cli.UserError('the ONNX runtime needs the export\'s model.onnx, which {} lacks; add it with '
                            'python -m network.export --onnx {}'.format(directory, directory))
    return 'onnx' if has_model and has_runtime else 'tensorflow'


def resolve_network(source, image_size=None, rep=None, threads=None, tf_warp=False, runtime='auto'):
    """Check a model source without loading TensorFlow: (image size N, function opening the
    network, the preprocessing record of its training data or None for models older than it).
    runtime: of an export, see `export_runtime`; a checkpoint runs in TensorFlow."""
    from network.export import ExportError, is_export, read_meta
    if runtime not in RUNTIMES:
        raise cli.UserError('runtime {!r}: choose from {}'.format(runtime, ', '.join(RUNTIMES)))
    if is_export(source):
        try:
            meta = read_meta(source)
        except ExportError as e:
            raise cli.UserError(str(e))
        size = cubic_size(meta['image_size'], 'the export\'s')
        if image_size not in (None, size):
            raise cli.UserError('--image_size {}: the export {} is frozen at {}'.format(image_size, source, size))
        if rep is not None:
            raise cli.UserError('-r/--rep applies to checkpoints; an export is frozen with its repeats')
        network = OnnxNetwork if export_runtime(source, meta, runtime) == 'onnx' else ExportedNetwork
        return size, lambda: network(source, threads), meta.get('preprocessing')
    if runtime == 'onnx':
        raise cli.UserError('the ONNX runtime runs an export\'s model.onnx; {} is a train.py checkpoint (export it '
                            'with predict.py -c {} --export DIR)'.format(source, source))
    if source == DEFAULT_MODEL and not os.path.exists(source):
        raise cli.UserError('the shipped model {} is missing from this copy of the project; give -c RUN'.format(source))
    run = runs.Run(source)
    size = image_size or cubic_size(run.config.image_size, 'the checkpoint\'s')
    return size, lambda: CheckpointNetwork(run.prefix, size, rep, threads, tf_warp), run.config.preprocessing


def preprocessing_options(record, image_size, overrides=None):
    """The `data_util.images.preprocess` options of a pair: each override given (not None)
    wins, then the model's record (what its training data went through), then the converter's
    defaults. UserError naming the option that cannot work."""
    from data_util.images import PrepareError, check_options, preprocessing_record
    options = preprocessing_record(image_size=image_size)
    if record:
        options.update({k: record[k] for k in PREPROCESSING_KEYS if k in record})
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    options['percentiles'], options['window'] = tuple(options['percentiles']), tuple(options['window'])
    try:
        check_options(**{k: options[k] for k in PREPROCESSING_KEYS if k != 'modality'})
    except PrepareError as e:
        raise cli.UserError(str(e))
    return {k: options[k] for k in ('image_size',) + PREPROCESSING_KEYS}


# ---------------------------------------------------------------- images

def image_from_array(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    """A numpy array indexed [X, Y, Z] (ITK index order) -> sitk.Image with that geometry
    (spacing in mm, origin in mm, direction 3x3 or 9 numbers; default the identity)."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in np.reshape(np.eye(3) if direction is None else direction, 9)])
    return image


def read_image(image, name):
    """An image argument (sitk.Image or a path) -> a checked 3-D scalar sitk.Image."""
    import SimpleITK as sitk
    from data_util.images import PrepareError, check_finite
    from data_util.images import read_image as read_file
    try:
        if isinstance(image, sitk.Image):
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                raise PrepareError('{}: a 3-D scalar image is needed'.format(name))
        else:
            image = read_file(os.fspath(image))
        check_finite(image, name)
    except PrepareError as e:
        raise cli.UserError(str(e))
    return image


def read_label_map(label, image, name):
    """A label map argument on ``image``'s grid -> sitk.Image; UserError naming it otherwise."""
    import SimpleITK as sitk
    from data_util.images import PrepareError, check_label_geometry
    label = read_image(label, name)
    try:
        check_label_geometry(image, label, name)
    except PrepareError as e:
        raise cli.UserError(str(e))
    values = sitk.GetArrayViewFromImage(label)
    if values.dtype.kind == 'f' and not (np.all(np.isfinite(values)) and np.all(values == np.rint(values))):
        raise cli.UserError('{}: a label map must hold integer values'.format(name))
    if values.min() < 0 or values.max() > 65535:
        raise cli.UserError('{}: label values must lie in 0..65535, got {}..{}'.format(name, values.min(), values.max()))
    return label


class Preprocessed(typing.NamedTuple):
    """A pair on its preprocessed grids (`preprocess_pair`): volumes uint8 [N, N, N], their
    `Geometry`s, and ``outside``: {'fixed': f, 'moving': f}, the fraction of each image's
    foreground outside its grid's cube (`data_util.images.foreground_outside`) for a model with
    a fixed field of view, else None (its crop box holds the whole foreground)."""
    fixed_volume: np.ndarray
    moving_volume: np.ndarray
    fixed_geometry: object
    moving_geometry: object
    outside: dict


def preprocess_pair(fixed, moving, options):
    """Both images (sitk.Image) on their own preprocessed grids (`data_util.images.preprocess`
    with `preprocessing_options`, no label maps): a `Preprocessed`; UserError when an image
    cannot be preprocessed."""
    from data_util.images import PrepareError, foreground_outside, preprocess
    try:
        fixed_volume, _, fixed_geometry = preprocess(fixed, None, **options)
        moving_volume, _, moving_geometry = preprocess(moving, None, **options)
    except PrepareError as e:
        raise cli.UserError(str(e))
    outside = None
    if options.get('field_of_view'):
        outside = {name: round(foreground_outside(image, geometry, options['modality'], options['threshold']), 4)
                   for name, image, geometry in (('fixed', fixed, fixed_geometry), ('moving', moving, moving_geometry))}
    return Preprocessed(fixed_volume, moving_volume, fixed_geometry, moving_geometry, outside)


def outside_warnings(report, paths):
    """One line per image of a registered pair (report: `Result.report`; paths: {'fixed': path,
    'moving': path}) whose foreground lies more than OUTSIDE_WARNING outside the model's field of
    view, saying what that means."""
    outside = report.get('foreground_outside_field_of_view') or {}
    side = report['preprocessing'].get('field_of_view')
    return ['{}: {:.0f} % of its foreground lies outside the model\'s {:g} mm field of view (a cube around its centre '
            'of mass), which the network does not see: the displacement there is the cube border\'s; crop the scan '
            'to the anatomy the model was trained on (a brain model: skull-stripped brains)'.format(
                paths[name], 100 * outside[name], side)
            for name in ('fixed', 'moving') if outside.get(name, 0.0) > OUTSIDE_WARNING]


def geometry_record(image):
    """The geometry of a sitk.Image as JSON-able lists."""
    return {'size': list(image.GetSize()), 'spacing': list(image.GetSpacing()),
            'origin': list(image.GetOrigin()), 'direction': list(image.GetDirection())}


# ---------------------------------------------------------------- registration

@dataclasses.dataclass
class Result:
    """What `Model.register` returns.

    warped: the moving image on the fixed image's grid (its pixel type); field: the
    displacement field on the fixed grid, a sitk vector image of 3 components in mm (float64,
    or float32 with field_dtype); field_array: the same as numpy [nz, ny, nx, 3] float64;
    warped_seg: the moving label map warped (nearest neighbour) or None; flow: the network's
    flow on the fixed preprocessed grid [N, N, N, 3] (voxels); report: JSON-able dict (model,
    preprocessing, grids, displacement statistics, folding fraction, Dice per label with both
    label maps, wall / CPU seconds per stage).
    """
    warped: object
    field: object
    field_array: np.ndarray
    warped_seg: object
    flow: np.ndarray
    report: dict


class Model:
    """A registration model loaded once: ``register(fixed, moving)`` for as many pairs as wanted.

    network: an object with ``image_size``, ``info`` and ``flow(fixed, moving)`` (uint8-range
    volumes [N, N, N] -> flow [N, N, N, 3]); preprocessing: `preprocessing_options` of the pairs.
    """

    def __init__(self, network, preprocessing, load_seconds=None, threads=None):
        self.network = network
        self.preprocessing = preprocessing
        self.image_size = network.image_size
        self.info = network.info
        self.load_seconds = load_seconds
        self.threads = threads
        self.refiners = {}

    def refiner(self, **settings):
        """The `network.refine.Refiner` of these settings, built once per model."""
        key = tuple(sorted(settings.items()))
        if key not in self.refiners:
            from network.refine import Refiner
            self.refiners[key] = Refiner([self.image_size] * 3, threads=self.threads, **settings)
        return self.refiners[key]

    def register(self, fixed, moving, moving_seg=None, fixed_seg=None, default_value=0.0, field_dtype='float64',
                 preprocessed=None, clock=None, refine=0, progress=None, **refine_settings):
        """Register ``moving`` to ``fixed`` (sitk.Images or paths; see the module doc).

        moving_seg: label map of the moving image, warped along; fixed_seg: label map of the
        fixed image, for Dice per label against the warped one (both needed for Dice).
        preprocessed: `preprocess_pair` of these images with this model's preprocessing, when
        already computed. clock: a `Stopwatch` to add this call's stages to. refine: iterations
        of instance optimisation after the network (network/refine.py; refine_settings: factor,
        window, weight, learning_rate, diffeomorphic, squarings); progress(i) after each.
        Returns a `Result`.
        """
        import SimpleITK as sitk
        from data_util.geometry import dice_per_label, displacement_field, field_image, folding_fraction, warp_labels
        if field_dtype not in ('float32', 'float64'):
            raise cli.UserError('field dtype {!r}: float32 or float64'.format(field_dtype))
        if fixed_seg is not None and moving_seg is None:
            raise cli.UserError('a fixed label map is compared with the warped moving one; give both')
        clock = clock or Stopwatch()
        fixed, moving = read_image(fixed, 'the fixed image'), read_image(moving, 'the moving image')
        if moving_seg is not None:
            moving_seg = read_label_map(moving_seg, moving, 'the moving label map')
        if fixed_seg is not None:
            fixed_seg = read_label_map(fixed_seg, fixed, 'the fixed label map')
        if preprocessed is None:
            with clock.stage('preprocess'):
                preprocessed = preprocess_pair(fixed, moving, self.preprocessing)
        fixed_volume, moving_volume, fixed_geometry, moving_geometry, outside = preprocessed
        with clock.stage('network'):
            flow = np.asarray(self.network.flow(fixed_volume, moving_volume))
        expected = (self.image_size,) * 3 + (3,)
        if flow.shape != expected:
            raise cli.UserError('the model returned a flow of shape {}, expected {}'.format(flow.shape, expected))
        refinement = None
        if refine:
            refiner = self.refiner(**refine_settings)
            with clock.stage('refine'):
                flow, refinement = refiner.refine(fixed_volume, moving_volume, flow, refine, progress)
        report = {'model': self.info, 'image_size': self.image_size,
                  'preprocessing': dict(self.preprocessing, percentiles=list(self.preprocessing['percentiles']),
                                        window=list(self.preprocessing['window'])),
                  'default_value': default_value, 'field_dtype': field_dtype, 'refinement': refinement,
                  'fixed_geometry': geometry_record(fixed), 'moving_geometry': geometry_record(moving),
                  'preprocessed_grids': {'fixed': _geometry_dict(fixed_geometry), 'moving': _geometry_dict(moving_geometry)},
                  'foreground_outside_field_of_view': outside,
                  'field_convention': 'u(x) = x_moving - x_fixed in mm, components along physical x, y, z (LPS, '
                                      'ITK order), on the fixed file\'s grid; warped = sitk.Resample(moving, fixed, '
                                      'sitk.DisplacementFieldTransform(field)); outside the fixed preprocessed cube '
                                      'the network flow is extended by border clamping'}
        with clock.stage('resample'):
            field = displacement_field(flow, fixed_geometry, moving_geometry, fixed, self.threads or 1)
            vectors = field_image(field, fixed)
            transform = sitk.DisplacementFieldTransform(sitk.Image(vectors))
            warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, default_value)
            if field_dtype == 'float32':
                vectors = sitk.Cast(vectors, sitk.sitkVectorFloat32)
            magnitude = np.sqrt(np.einsum('...c,...c->...', field, field))
            report['displacement_mm'] = {'mean': float(magnitude.mean()), 'max': float(magnitude.max()),
                                         'p99': float(np.percentile(magnitude[::2, ::2, ::2], 99))}
            del magnitude
            report['folding'] = folding_fraction(field, fixed, self.threads or 1)
            warped_seg = None
            if moving_seg is not None:
                warped_seg = warp_labels(moving_seg, fixed, transform)
                if fixed_seg is not None:
                    fixed_labels = sitk.GetArrayViewFromImage(fixed_seg)
                    before = sitk.Resample(moving_seg, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                           moving_seg.GetPixelID())
                    per_label, mean = dice_per_label(fixed_labels, sitk.GetArrayViewFromImage(warped_seg))
                    per_label_before, mean_before = dice_per_label(fixed_labels, sitk.GetArrayViewFromImage(before))
                    report['dice'] = {'mean': mean, 'mean_before': mean_before, 'per_label': per_label,
                                      'per_label_before': per_label_before}
        report.update(clock.report())
        return Result(warped, vectors, field, warped_seg, flow, report)


def _geometry_dict(geometry):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(geometry).items()}


def load_model(source=None, image_size=None, rep=None, threads=2, tf_warp=False, runtime='auto', **preprocessing):
    """A `Model` from a train.py run (DIR, DIR:STEP, a checkpoint prefix) or an export directory;
    default the shipped brain MRI model. preprocessing: overrides of the model's recorded
    preprocessing (modality, percentiles, window, threshold, margin, field_of_view).
    threads: CPU threads of the network's runtime, SimpleITK and the field's NumPy work.
    runtime: 'auto' (an export with its model.onnx runs in onnxruntime when that is
    installed, anything else in TensorFlow), 'onnx' (insist) or 'tensorflow'."""
    import SimpleITK as sitk
    unknown = sorted(set(preprocessing) - set(PREPROCESSING_KEYS))
    if unknown:
        raise cli.UserError('unknown preprocessing option(s) {} (known: {})'.format(
            ', '.join(unknown), ', '.join(PREPROCESSING_KEYS)))
    size, open_network, record = resolve_network(source or DEFAULT_MODEL, image_size, rep, threads, tf_warp, runtime)
    options = preprocessing_options(record, size, preprocessing)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    start = time.perf_counter()
    network = open_network()
    return Model(network, options, time.perf_counter() - start, threads)
