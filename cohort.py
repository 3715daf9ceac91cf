"""Registering pairs into output directories, one pair or a cohort: what predict.py writes.

A pair's directory holds the outputs predict.py's --outputs asks for (warped image, displacement
field, warped label map, previews) in the fixed file's format, and predict.json (the report of
`registration.Model.register` plus inputs and formats); everything is written into a staging
directory beside it and renamed at the end. A cohort (`run_batch`) is one directory per pair
plus summary.json / summary.csv, with the model loaded once per process: in this process with
the next pair read while this one registers, or on Dask workers (--workers N for a local
cluster, --dask ADDRESS for a running scheduler), each of which loads the model once.
"""
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import glob
import gzip
import io
import json
import os
import shutil
import tempfile
import time

import cli
import previews
import registration

FORMATS = {'nii.gz': '.nii.gz', 'nii': '.nii', 'mha': '.mha', 'mhd': '.mhd', 'nrrd': '.nrrd'}
EXTENSION_FORMATS = (('.nii.gz', 'nii.gz'), ('.nii', 'nii'), ('.mha', 'mha'), ('.mhd', 'mhd'),
                     ('.nrrd', 'nrrd'), ('.nhdr', 'nrrd'))
REPORT = 'predict.json'
OUTPUTS = ('warped', 'field', 'seg', 'preview')
SUMMARY_STAGES = ('read', 'preprocess', 'network', 'refine', 'resample', 'write')


def output_format(fixed_path, requested=None):
    """The output format key of FORMATS: requested, else the fixed file's, else 'nii.gz'."""
    if requested:
        return requested
    name = os.path.basename(os.path.normpath(fixed_path)).lower()
    for extension, fmt in EXTENSION_FORMATS:
        if name.endswith(extension):
            return fmt
    return 'nii.gz'


def check_output_dir(path, force, marker):
    """UserError unless ``path`` can be (re)placed: absent, or with --force an empty directory or
    one holding ``marker`` (a previous output of this script). Its parent must exist."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise cli.UserError('{}: parent directory {} does not exist'.format(path, parent))
    if not os.path.lexists(path):
        return
    if not force:
        raise cli.UserError('{} exists; use --force to replace it or choose another directory'.format(path))
    if not os.path.isdir(path) or os.path.islink(path):
        raise cli.UserError('{} exists and is not a directory; not replacing it'.format(path))
    if os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise cli.UserError('{} exists and is not an output of predict.py (no {}); not replacing it'.format(
            path, marker))


@contextlib.contextmanager
def staging_directory(path):
    """A temporary directory beside ``path`` that replaces ``path`` when the block succeeds and is
    removed when it fails (an existing ``path`` is swapped out and deleted only after success)."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    staging = tempfile.mkdtemp(prefix='.' + name + '.', suffix='.tmp', dir=parent)
    cli.plain_permissions(staging, directory=True)
    try:
        yield staging
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix='.' + name + '.', suffix='.old', dir=parent)
            os.rename(path, os.path.join(old, name))
        os.rename(staging, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------- main steps

def write_image(image, path, fmt, compress=True):
    """sitk.WriteImage with a one-line UserError. compress: deflate where the format allows it
    (.nii never). Without it a .nii.gz is still a gzip file, of stored (not deflated) blocks:
    ITK deflates every .nii.gz, which for a float displacement field (mantissas of noise) costs
    seconds of CPU to save about a tenth of its size."""
    import SimpleITK as sitk
    try:
        if compress or fmt != 'nii.gz':
            sitk.WriteImage(image, path, compress and fmt != 'nii')
            return
        plain = path[:-len('.gz')]
        sitk.WriteImage(image, plain, False)
        with open(plain, 'rb') as source, gzip.open(path, 'wb', compresslevel=0) as target:
            shutil.copyfileobj(source, target, 1 << 22)
        os.remove(plain)
    except (RuntimeError, OSError) as e:
        raise cli.UserError('cannot write {}: {}'.format(path, str(e).strip().splitlines()[-1]))


@dataclasses.dataclass
class Pair:
    """One registration job: its id (the output sub-directory in batch mode) and its files."""
    fixed: str
    moving: str
    moving_seg: str = None
    fixed_seg: str = None
    id: str = None


def open_model(args, network):
    """(image size N, function opening the network, preprocessing options) without TensorFlow."""
    if network is None:
        image_size, open_network, record = registration.resolve_network(
            args.checkpoint, args.image_size, args.rep, args.threads, args.tf_warp, args.runtime)
    else:
        image_size, open_network, record = network.image_size, lambda: network, network.info.get('preprocessing')
    options = registration.preprocessing_options(record, image_size,
                                                 {k: getattr(args, k) for k in registration.PREPROCESSING_KEYS})
    return image_size, open_network, options


def read_pair(pair, options, clock):
    """The pair's images and label maps (checked) and both images preprocessed: (images, preprocessed).
    The files are read at once (SimpleITK lets go of the GIL), their errors reported in the order
    fixed, moving, fixed_seg, moving_seg."""
    with clock.stage('read'):
        names = {'fixed': pair.fixed, 'moving': pair.moving, 'fixed_seg': '{} (--fixed_seg)'.format(pair.fixed_seg),
                 'moving_seg': '{} (--moving_seg)'.format(pair.moving_seg)}
        keys = [key for key in names if getattr(pair, key)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(keys)) as pool:
            jobs = {key: pool.submit(registration.read_image, getattr(pair, key), names[key]) for key in keys}
            images = {key: jobs[key].result() for key in keys}
        for key, image_key in (('fixed_seg', 'fixed'), ('moving_seg', 'moving')):
            if key in images:
                images[key] = registration.read_label_map(images[key], images[image_key], names[key])
    with clock.stage('preprocess'):
        preprocessed = registration.preprocess_pair(images['fixed'], images['moving'], options)
    return images, preprocessed


def register_and_write(model, pair, images, preprocessed, output, args, fmt, clock, progress=False):
    """Register a read pair and write the outputs args.outputs asks for into ``output`` (through a
    staging directory); returns the pair's report (also written as predict.json). progress: a
    progress bar over the refinement's iterations (--refine)."""
    return register_read_pair(model, pair, images, preprocessed, args, fmt, clock, progress)(output)


def register_read_pair(model, pair, images, preprocessed, args, fmt, clock, progress=False):
    """Register a read pair; returns ``write(output)``, which writes the outputs into ``output``
    and returns the pair's report (so that batch mode writes one pair while it registers the next)."""
    bar = cli.progress(args.refine, 'refining', 'iteration') if progress and args.refine else None
    result = model.register(images['fixed'], images['moving'], images.get('moving_seg'), images.get('fixed_seg'),
                            args.default_value, args.field_dtype, preprocessed=preprocessed, clock=clock,
                            refine=args.refine, progress=bar and (lambda i: bar.update()), **args.refine_options)
    if bar:
        bar.close()
    for line in registration.outside_warnings(result.report, {'fixed': pair.fixed, 'moving': pair.moving}):
        cli.progress_write('warning: ' + line)
    extension = FORMATS[fmt]
    outputs = {}
    if 'warped' in args.outputs:
        outputs['warped'] = 'warped' + extension
    if 'field' in args.outputs:
        outputs['field'] = 'field' + extension
    if 'seg' in args.outputs and result.warped_seg is not None:
        outputs['warped_seg'] = 'warped_seg' + extension
    if 'preview' in args.outputs:
        outputs['previews'] = previews.FILES
    report = {'fixed': os.path.abspath(pair.fixed), 'moving': os.path.abspath(pair.moving),
              'fixed_seg': pair.fixed_seg and os.path.abspath(pair.fixed_seg),
              'moving_seg': pair.moving_seg and os.path.abspath(pair.moving_seg),
              'format': fmt, 'outputs': outputs, 'threads': args.threads}
    report.update(result.report)
    return functools.partial(write_outputs, model, images, result, report, outputs, args, fmt, clock)


def write_outputs(model, images, result, report, outputs, args, fmt, clock, output):
    """The registered pair's outputs ({kind: file name}) and its report into ``output`` through a
    staging directory; returns the report."""
    import SimpleITK as sitk
    from data_util.geometry import warp_labels
    fixed, moving = images['fixed'], images['moving']
    with staging_directory(output) as staging:
        warped, warped_seg = result.warped, result.warped_seg
        if 'field' in outputs and args.field_dtype == 'float64':
            with clock.stage('write'):
                stored = stored_geometry(result.field, staging, fmt)
            if stored != registration.geometry_record(fixed):
                # the format rounds the geometry (an oblique NIfTI header): warp with the field as it
                # will be read back, so that re-applying the file reproduces the outputs exactly
                with clock.stage('resample'):
                    written = sitk.Image(result.field)
                    written.SetSpacing(stored['spacing'])
                    written.SetOrigin(stored['origin'])
                    written.SetDirection(stored['direction'])
                    transform = sitk.DisplacementFieldTransform(written)
                    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, args.default_value)
                    if warped_seg is not None:
                        warped_seg = warp_labels(images['moving_seg'], fixed, transform)
        with clock.stage('write'), concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
            # the field, the largest file (118 MB of float64 for a 1 mm brain), is written while the
            # other outputs are made: SimpleITK and zlib let go of the GIL as they write
            field = writer.submit(write_image, result.field, os.path.join(staging, outputs['field']), fmt,
                                  compress=False) if 'field' in outputs else None
            if 'warped' in outputs:
                write_image(warped, os.path.join(staging, outputs['warped']), fmt)
            if 'warped_seg' in outputs:
                write_image(warped_seg, os.path.join(staging, outputs['warped_seg']), fmt)
            if 'previews' in outputs:
                moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, args.default_value)
                previews.write(staging, fixed, moving_on_fixed, warped, result.field_array, moving, model.preprocessing)
            if field is not None:
                field.result()
        report.update(clock.report())
        with open(os.path.join(staging, REPORT), 'w') as f:
            json.dump(report, f, indent=2)
            f.write('\n')
    return report


def stored_geometry(image, directory, fmt):
    """The geometry record (registration.geometry_record) that ``image`` has once written in
    ``fmt`` and read back, which may round it: a small image of its pixel type and geometry
    written into a scratch directory in ``directory`` and read back, header only (2 voxels a
    side: formats drop an axis of 1)."""
    import SimpleITK as sitk
    probe = sitk.Image([2, 2, 2], image.GetPixelID(), image.GetNumberOfComponentsPerPixel())
    probe.SetSpacing(image.GetSpacing())
    probe.SetOrigin(image.GetOrigin())
    probe.SetDirection(image.GetDirection())
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        path = os.path.join(scratch, 'probe' + FORMATS[fmt])
        write_image(probe, path, fmt)
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return {'size': list(image.GetSize()), 'spacing': list(reader.GetSpacing()),
                'origin': list(reader.GetOrigin()), 'direction': list(reader.GetDirection())}


# ---------------------------------------------------------------- batch mode

def batch_pairs(args):
    """The pairs of --pairs CSV (columns fixed, moving[, moving_seg, fixed_seg, id]; relative
    paths from the CSV's directory) or of --fixed F --moving 'GLOB' (ids: the moving file names)."""
    from data_util.prepare import scan_id_from_path
    if args.pairs:
        if args.moving or args.fixed or args.moving_seg or args.fixed_seg:
            raise cli.UserError('--pairs lists every file; give no --fixed, --moving or label maps with it')
        pairs = read_pairs_csv(args.pairs)
    else:
        if not args.fixed:
            raise cli.UserError('--moving {!r} is a pattern: give the --fixed image they are registered to'.format(
                args.moving))
        if args.moving_seg and '{id}' not in args.moving_seg:
            raise cli.UserError('--moving_seg with a --moving pattern is a template with {id}, e.g. seg/{id}.nii.gz')
        paths = sorted(glob.glob(args.moving))
        if not paths:
            raise cli.UserError('--moving {!r} matches no file'.format(args.moving))
        pairs = []
        for path in paths:
            pair_id = scan_id_from_path(path)
            pairs.append(Pair(args.fixed, path, args.moving_seg and args.moving_seg.replace('{id}', pair_id),
                              args.fixed_seg, pair_id))
    ids = [p.id for p in pairs]
    duplicate = sorted({i for i in ids if ids.count(i) > 1})
    if duplicate:
        raise cli.UserError('pair id {!r} appears twice; give ids in an id column'.format(duplicate[0]))
    bad = [i for i in ids if not i or '/' in i or i in ('.', '..')]
    if bad:
        raise cli.UserError('pair id {!r} cannot name an output directory'.format(bad[0]))
    return pairs


def read_pairs_csv(path):
    """Pairs of a CSV with a header row naming its columns (fixed, moving required)."""
    if not os.path.isfile(path):
        raise cli.UserError('{}: no such pairs file'.format(path))
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline='', encoding='utf-8-sig') as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row) and not row[0].startswith('#')]
    if not rows:
        raise cli.UserError('{}: lists no pairs'.format(path))
    header = [cell.strip() for cell in rows[0]]
    known = [field.name for field in dataclasses.fields(Pair)]
    if 'fixed' not in header or 'moving' not in header or any(h not in known for h in header):
        raise cli.UserError('{}: the header row must name the columns, fixed and moving and optionally {} '
                            '(got {})'.format(path, ', '.join(k for k in known if k not in ('fixed', 'moving')),
                                              ','.join(header)))
    pairs = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise cli.UserError('{}:{}: {} cells, the header has {}'.format(path, number, len(row), len(header)))
        cells = {h: c.strip() or None for h, c in zip(header, row)}
        if not cells['fixed'] or not cells['moving']:
            raise cli.UserError('{}:{}: fixed and moving are required'.format(path, number))
        files = {k: v if k == 'id' or v is None else os.path.join(base, v) for k, v in cells.items()}
        if not files.get('id'):
            files['id'] = '{:04d}-{}'.format(number - 1, os.path.basename(cells['moving']).split('.')[0])
        pairs.append(Pair(**files))
    if not pairs:
        raise cli.UserError('{}: lists no pairs'.format(path))
    return pairs


def run_batch(args, pairs, network):
    """Every pair into args.output/<id>/ with the model loaded once; the next pair is read and
    preprocessed while this one is registered, and this one is written while the next one is
    registered (at most one pair waits to be written). A pair already done (its predict.json exists) is
    skipped; a pair that fails is reported and skipped. Writes summary.json and summary.csv;
    UserError at the end if any pair failed."""
    import SimpleITK as sitk
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise cli.UserError('{} exists and is not a directory'.format(args.output))
    image_size, open_network, options = open_model(args, network)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    todo = [p for p in pairs if not os.path.isfile(os.path.join(args.output, p.id, REPORT))]
    records = {}
    for pair in pairs:
        if pair not in todo:
            with open(os.path.join(args.output, pair.id, REPORT)) as f:
                records[pair.id] = dict(summary_record(pair, json.load(f)), status='done before')
    start = time.perf_counter()
    if todo and (args.workers or args.dask):
        if network is not None:
            raise cli.UserError('Dask workers open the model themselves from -c; no model object can be given')
        records.update(run_on_dask(args, todo))
        return write_summary(args, pairs, records, options, None, time.perf_counter() - start, len(todo), None)
    model = registration.Model(open_network(), options, threads=args.threads) if todo else None
    load_seconds = time.perf_counter() - start

    def prepare(pair):
        clock = registration.Stopwatch()
        return clock, read_pair(pair, options, clock)

    def finish(pair, writing):
        records[pair.id] = writing.result()
        if records[pair.id]['status'] == 'failed':
            cli.progress_write('{}: failed: {}'.format(pair.id, records[pair.id]['error']))
        progress.update()

    progress = cli.progress(len(todo), 'registering', 'pair')
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        upcoming = reader.submit(prepare, todo[0]) if todo else None
        previous = None
        for index, pair in enumerate(todo):
            try:
                clock, (images, preprocessed) = upcoming.result()
            except cli.UserError as e:
                clock, failure = None, e
            upcoming = reader.submit(prepare, todo[index + 1]) if index + 1 < len(todo) else None
            write = batch_register(model, pair, (images, preprocessed) if clock else failure, args, clock)
            if previous:
                finish(*previous)
            previous = pair, writer.submit(write)
        if previous:
            finish(*previous)
    progress.close()
    return write_summary(args, pairs, records, options, model and model.info, time.perf_counter() - start,
                         len(todo), load_seconds)


def batch_register(model, pair, loaded, args, clock):
    """Register one read pair of a batch; returns ``write()``, which writes it into
    args.output/<id>/ and returns its summary line. A UserError (in ``loaded``, the failure of
    reading it, in registering or in writing) makes a 'failed' line."""
    try:
        if isinstance(loaded, cli.UserError):
            raise loaded
        images, preprocessed = loaded
        output = os.path.join(args.output, pair.id)
        check_output_dir(output, True, REPORT)
        write = register_read_pair(model, pair, images, preprocessed, args, output_format(pair.fixed, args.format),
                                   clock)
    except cli.UserError as e:
        return functools.partial(failed_record, pair, e)

    def write_and_summarize():
        try:
            return summary_record(pair, write(output))
        except cli.UserError as e:
            return failed_record(pair, e)
    return write_and_summarize


def failed_record(pair, error):
    """The summary line of a pair that failed."""
    return {'id': pair.id, 'fixed': pair.fixed, 'moving': pair.moving, 'status': 'failed',
            'error': ' '.join(str(error).split())}


_WORKER_MODELS = {}


def register_on_worker(pair, args):
    """A Dask task: one pair registered and written on a worker, which loads the model on its
    first pair and keeps it for the next ones. Returns the pair's summary line."""
    key = (args.checkpoint, args.image_size, args.rep, args.threads, args.tf_warp, args.runtime,
           tuple((k, getattr(args, k)) for k in registration.PREPROCESSING_KEYS))
    if key not in _WORKER_MODELS:
        image_size, open_network, options = open_model(args, None)
        _WORKER_MODELS[key] = registration.Model(open_network(), options, threads=args.threads)
    model = _WORKER_MODELS[key]
    clock = registration.Stopwatch()
    try:
        loaded = read_pair(pair, model.preprocessing, clock)
    except cli.UserError as e:
        loaded = e
    return batch_register(model, pair, loaded, args, clock)()


def run_on_dask(args, pairs):
    """{id: summary line} of the pairs registered by Dask workers: a local cluster of args.workers
    processes (one thread each), or the scheduler at args.dask (its workers need this project on
    their PYTHONPATH and the input files at the same paths)."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise cli.UserError('--workers / --dask need Dask: pip install "dask[distributed]"')
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None) if args.workers else None
    records = {}
    try:
        with Client(cluster or args.dask) as client:
            futures = [client.submit(register_on_worker, pair, args, key='pair-' + pair.id, pure=False)
                       for pair in pairs]
            progress = cli.progress(len(pairs), 'registering on Dask', 'pair')
            for future in as_completed(futures):
                record = future.result()
                records[record['id']] = record
                if record['status'] == 'failed':
                    cli.progress_write('{}: failed: {}'.format(record['id'], record['error']))
                progress.update()
            progress.close()
    except OSError as e:
        raise cli.UserError('cannot reach the Dask scheduler {}: {}'.format(args.dask, e))
    finally:
        if cluster is not None:
            cluster.close()
    return records


def write_summary(args, pairs, records, options, model_info, elapsed, registered, load_seconds):
    """summary.json and summary.csv of a batch; the summary (UserError at the end if a pair failed)."""
    ordered = [records[p.id] for p in pairs]
    failed = [r for r in ordered if r['status'] == 'failed']
    summary = {'model': model_info, 'preprocessing': dict(options, percentiles=list(
        options['percentiles']), window=list(options['window'])), 'outputs': args.outputs,
        'field_dtype': args.field_dtype, 'pairs': ordered, 'registered': registered - len(failed),
        'failed': len(failed), 'skipped': len(pairs) - registered,
        'load_model_seconds': None if load_seconds is None else round(load_seconds, 4),
        'workers': args.workers or args.dask or 1, 'seconds': round(elapsed, 4),
        'pairs_per_minute': round(60.0 * registered / elapsed, 2) if registered else None}
    cli.write_json(os.path.join(args.output, 'summary.json'), summary)
    write_summary_csv(os.path.join(args.output, 'summary.csv'), ordered)
    if failed:
        raise cli.UserError('{} of {} pairs failed (first: {}: {}); see {}'.format(
            len(failed), len(pairs), failed[0]['id'], failed[0]['error'], os.path.join(args.output, 'summary.csv')))
    return summary


def summary_record(pair, report):
    """A registered pair's line of the batch summary."""
    record = {'id': pair.id, 'fixed': report['fixed'], 'moving': report['moving'], 'status': 'registered',
              'folding': report['folding'], 'displacement_mm_mean': report['displacement_mm']['mean'],
              'seconds': {k: report['seconds'].get(k, 0.0) for k in SUMMARY_STAGES},
              'report': os.path.join(pair.id, REPORT)}
    if 'dice' in report:
        record['dice'] = report['dice']['mean']
        record['dice_before'] = report['dice']['mean_before']
        record['dice_per_label'] = report['dice']['per_label']
    return record


def write_summary_csv(path, records):
    """One row per pair: id, status, files, Dice (mean, before, per label), folding, seconds per stage."""
    labels = sorted({k for r in records for k in r.get('dice_per_label', {})}, key=lambda v: int(v))
    columns = (['id', 'status', 'fixed', 'moving', 'dice', 'dice_before', 'folding', 'displacement_mm_mean']
               + ['seconds_' + s for s in SUMMARY_STAGES] + ['dice_' + v for v in labels] + ['error'])
    lines = [columns]
    for r in records:
        row = dict(r, **{'seconds_' + s: v for s, v in r.get('seconds', {}).items()},
                   **{'dice_' + v: d for v, d in r.get('dice_per_label', {}).items()})
        lines.append(['' if row.get(c) is None else row.get(c, '') for c in columns])
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)
    cli.write_atomic(path, buffer.getvalue())


