"""Convert real scans (NIfTI, MHA/MHD, NRRD, FreeSurfer MGZ, DICOM series) into the project's HDF5 + JSON spec.

    python -m data_util.prepare --images 'scans/*.nii.gz' [--labels 'labels/{id}_seg.nii.gz']
                                [--landmarks 'points/{id}.csv'] [--id_regex REGEX]
                                --output OUT.h5 [--spec OUT.json] [options]
    python -m data_util.prepare --list scans.csv --output OUT.h5 --spec OUT.json [options]
    python -m data_util.prepare --lpba40 ../shared/data/LPBA40 --output datasets/lpba.h5

Every scan goes through `data_util.images.preprocess` (read, orient, crop, resample, window:
see that module).

HDF5 layout (SPEC section 6): one group per scan id with `volume` uint8 [N, N, N],
optional `segmentation` (uint8/uint16 [N, N, N]), optional `original_segmentation` (the label
map as read, on the original file's grid, [X, Y, Z] in ITK index order: evaluation measures
Dice there, see data_util/geometry.py) and optional `point` float32 [k, 3]; the
group's attributes record the geometry (see `data_util.geometry.Geometry`): original_size / _spacing / _origin /
_direction of the file as read, grid_size / _spacing / _origin / _direction of the
preprocessed grid in the same physical space (directions as 9 numbers, row-major, ITK's
GetDirection order), intensity_window (the raw values mapped to 0 and 255), modality and the
source file names. `data_util.geometry.preprocessed_grid_image` and `grid_to_original` use them to bring any
result on the grid back onto the original file's grid.

LPBA40 mode (--lpba40 DIR; DIR holds fixed.nii.gz = S01, test/S02..S10, train/S11..S40 and
label/Sxx.delineation.structure.label.nii.gz): ids S01..S40, MR, image_type "brain", atlas
S01; subsets train = S11..S35, val = S36..S40 (held out from training, for model selection),
test = S02..S10; schemes "1" = train, "2" = val, "test" = test; the 56 label values (21..182)
in segmentation_class_value; a fixed field of view of 192 mm (LPBA40_FIELD_OF_VIEW: every
brain lies within 92 mm of its centroid, 1.5 mm voxels at 128^3) unless --field_of_view,
--spacing or --roi is given. This is datasets/lpba.json.

The spec records the preprocessing (key "preprocessing": image_size, modality, percentiles,
window, threshold, margin, spacing, field_of_view, roi); train.py copies it into the run's
args.json, and predict.py preprocesses a user's pair with it.

Volumes and segmentations are stored gzip-compressed (level 1; h5py reads them transparently).
The JSON spec follows the original schema (SPEC section 6); its file path is written
relative to the spec's own directory. Every input problem stops the run with a one-line
``error: ...`` on stderr and exit status 2; the outputs are written to temporary files and
renamed into place only when everything succeeded.
"""
import contextlib
import csv
import dataclasses
import fnmatch
import glob
import json
import os
import re
import signal
import sys
import tempfile

import numpy as np

import cli
from data_util.images import (ARRAY_CONVENTION, DEFAULT_CT_WINDOW, DEFAULT_IMAGE_SIZE, DEFAULT_MARGIN,
                              DEFAULT_PERCENTILES, MODALITIES, PrepareError, check_finite, check_options, label_array,
                              landmarks_to_voxels, preprocess, preprocessing_record, read_image, read_landmarks)

IMAGE_EXTENSIONS = ('.nii.gz', '.nii', '.mha', '.mhd', '.nrrd', '.nhdr', '.dcm', '.mgz', '.mgh')

LPBA40_ATLAS = 'S01'
LPBA40_FIELD_OF_VIEW = 192.0
LPBA40_SUBSETS = {
    'train': ['S{:02d}'.format(i) for i in range(11, 36)],
    'val': ['S{:02d}'.format(i) for i in range(36, 41)],
    'test': ['S{:02d}'.format(i) for i in range(2, 11)],
}


@dataclasses.dataclass
class ScanEntry:
    """One scan to convert: its id (the HDF5 group name) and its files."""
    id: str
    image: str
    label: str = None
    landmarks: str = None


def write_scan(h5, entry, volume, segmentation, points, geometry, modality,
               original_segmentation=None):
    """Write one preprocessed scan as group entry.id of an open h5py.File."""
    group = h5.create_group(entry.id)
    group.create_dataset('volume', data=volume, compression='gzip', compression_opts=1)
    for key, array in (('segmentation', segmentation),
                       ('original_segmentation', original_segmentation)):
        if array is not None:
            group.create_dataset(key, data=array, compression='gzip', compression_opts=1)
    if points is not None:
        group.create_dataset('point', data=points)
    geometry.to_attrs(group.attrs)
    group.attrs['modality'] = modality
    group.attrs['convention'] = ARRAY_CONVENTION
    for key in ('image', 'label', 'landmarks'):
        if getattr(entry, key):
            group.attrs['source_' + key] = os.path.abspath(getattr(entry, key))


def convert_scan(entry, h5, options):
    """Read, preprocess and write one `ScanEntry`; returns the set of its label values."""
    image = read_image(entry.image)
    check_finite(image, entry.image)
    label = read_image(entry.label) if entry.label else None
    volume, segmentation, geometry = preprocess(image, label, label_name=entry.label, **options)
    points = None
    if entry.landmarks:
        physical = read_landmarks(entry.landmarks)
        points = landmarks_to_voxels(physical, geometry)
        lost = np.sum(np.all(np.isfinite(physical), axis=1) & np.all(points == -1, axis=1))
        if lost:
            cli.progress_write('warning: {}: {} landmark(s) outside the preprocessed grid, stored as -1'.format(
                entry.landmarks, lost))
    original = None
    if label is not None:
        original = label_array(label, entry.label).transpose(2, 1, 0)
    write_scan(h5, entry, volume, segmentation, points, geometry, options.get('modality', 'mr'),
               original)
    if original is None:
        return set()
    return set(int(v) for v in np.unique(original)) - {0}


def scan_id_from_path(path, id_regex=None):
    """The scan id of an image path: the regex's first group (or whole match) on the file
    name, else the file name without its image extension."""
    name = os.path.basename(os.path.normpath(path))
    if id_regex:
        match = re.search(id_regex, name)
        if not match:
            raise PrepareError('{}: --id_regex {!r} does not match'.format(path, id_regex))
        return match.group(1) if match.groups() else match.group(0)
    for extension in IMAGE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[:-len(extension)]
    return name


def entries_from_glob(pattern, labels=None, landmarks=None, id_regex=None):
    """ScanEntries of the images matching a glob; labels / landmarks are path templates
    with '{id}' (e.g. 'labels/{id}_seg.nii.gz')."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise PrepareError('no image matches {!r}'.format(pattern))
    return [ScanEntry(scan_id,
                      path,
                      _fill_template(labels, scan_id, '--labels'),
                      _fill_template(landmarks, scan_id, '--landmarks'))
            for path in paths for scan_id in [scan_id_from_path(path, id_regex)]]


def _fill_template(template, scan_id, option):
    """A --labels / --landmarks path template with '{id}' filled in (None stays None)."""
    if not template:
        return None
    try:
        return template.format(id=scan_id)
    except (KeyError, IndexError, ValueError) as e:
        raise PrepareError('{} {!r}: the only placeholder of a path template is {{id}} ({}: {})'.format(
            option, template, type(e).__name__, e))


def entries_from_list(path):
    """ScanEntries of a CSV list: rows 'id,image[,label[,landmarks]]' (an optional header row
    starting with 'id', '#' comment rows, empty cells = none); relative paths are taken
    relative to the list's directory."""
    if not os.path.isfile(path):
        raise PrepareError('{}: no such list file'.format(path))
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, 'r', newline='', encoding='utf-8-sig') as f:
        for number, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith('#'):
                continue
            if number == 1 and cells[0].lower() == 'id':
                continue
            if len(cells) < 2 or len(cells) > 4 or not cells[0] or not cells[1]:
                raise PrepareError('{}:{}: expected id,image[,label[,landmarks]]'.format(
                    path, number))
            files = [os.path.join(base, c) if c else None for c in cells[1:]]
            entries.append(ScanEntry(cells[0], *files))
    if not entries:
        raise PrepareError('{}: lists no scans'.format(path))
    return entries


def lpba40_entries(root):
    """ScanEntries S01..S40 of the LPBA40 layout: fixed.nii.gz (S01), test/ (S02..S10),
    train/ (S11..S40), label/Sxx.delineation.structure.label.nii.gz."""
    entries = []
    for i in range(1, 41):
        scan_id = 'S{:02d}'.format(i)
        if i == 1:
            image = os.path.join(root, 'fixed.nii.gz')
        else:
            folder = 'test' if i <= 10 else 'train'
            image = os.path.join(root, folder, scan_id + '.delineation.skullstripped.nii.gz')
        label = os.path.join(root, 'label', scan_id + '.delineation.structure.label.nii.gz')
        entries.append(ScanEntry(scan_id, image, label))
    return entries


def check_entries(entries):
    """PrepareError for duplicate or invalid ids and for missing input files."""
    seen = set()
    for entry in entries:
        if not entry.id or '/' in entry.id or entry.id in ('.', '..'):
            raise PrepareError('invalid scan id {!r} (no "/" allowed)'.format(entry.id))
        if entry.id in seen:
            raise PrepareError('duplicate scan id {!r}'.format(entry.id))
        seen.add(entry.id)
        for key in ('image', 'label', 'landmarks'):
            path = getattr(entry, key)
            if path and not os.path.exists(path):
                raise PrepareError('{} {}: no such file or directory: {}'.format(
                    entry.id, key, path))


def match_ids(patterns, ids, what, strict=True):
    """The ids (in their order) matching any of the fnmatch patterns; PrepareError when
    strict and a pattern matches nothing."""
    for pattern in patterns:
        if strict and not any(fnmatch.fnmatchcase(i, pattern) for i in ids):
            raise PrepareError('{}: {!r} matches no scan'.format(what, pattern))
    return [i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)]


def default_schemes(subset_names):
    """Scheme "1" = subset 'train' (else the first subset), "2" = 'val' if present, and every
    other subset a scheme of its own name."""
    schemes = {}
    if 'train' not in subset_names and subset_names:
        schemes['1'] = {subset_names[0]: 1.0}
    for name in subset_names:
        key = {'train': '1', 'val': '2'}.get(name, name)
        schemes.setdefault(key, {name: 1.0})
    return schemes


def build_spec(name, h5_path, spec_path, ids, image_size, image_type, atlas=None,
               subsets=None, schemes=None, label_values=(), strict=True, preprocessing=None):
    """The JSON dataset spec (original schema) of a converted file.

    subsets: {name: [id patterns]} (default: one subset 'all'); schemes: {key: {subset:
    fraction}} (default `default_schemes`). With strict=False empty subsets are dropped
    (used by presets when only some scans were converted). preprocessing: the
    `preprocessing_record` of the conversion (key "preprocessing")."""
    prefix = name + '/'
    if subsets is None:
        subsets = {'all': ['*']}
    resolved = {}
    for subset, patterns in subsets.items():
        members = match_ids(patterns, ids, 'subset ' + subset, strict)
        if members:
            resolved[subset] = [prefix + i for i in members]
    if schemes is None:
        schemes = default_schemes(list(resolved))
    kept = {}
    for key, parts in schemes.items():
        for subset in parts:
            if subset not in subsets:
                raise PrepareError('scheme {}: unknown subset {!r}'.format(key, subset))
        parts = {s: f for s, f in parts.items() if s in resolved}
        if parts:
            kept[key] = parts
    relative = os.path.relpath(os.path.abspath(h5_path),
                               os.path.dirname(os.path.abspath(spec_path)))
    spec = {'files': {name: {'path': relative.replace(os.sep, '/'), 'type': 'HDF5'}},
            'image_size': [int(image_size)] * 3,
            'image_type': image_type}
    if atlas is not None:
        if atlas not in ids:
            raise PrepareError('atlas {!r} is not among the converted scans'.format(atlas))
        spec['atlas'] = prefix + atlas
    if label_values:
        spec['segmentation_class_value'] = {str(v): int(v) for v in sorted(label_values)}
    spec['subsets'] = resolved
    spec['schemes'] = kept
    if preprocessing is not None:
        spec['preprocessing'] = preprocessing
    return spec


def _temporary_path(path):
    """A new empty file beside `path`, with the permissions a plain open() would give."""
    handle, temporary = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                                         suffix='.tmp', dir=os.path.dirname(os.path.abspath(path)))
    os.close(handle)
    cli.plain_permissions(temporary)
    return temporary


def convert(entries, output, spec_path=None, name=None, image_type='brain', atlas=None,
            subsets=None, schemes=None, strict_subsets=True, progress=True, **options):
    """Convert ScanEntries into the HDF5 `output` (and the JSON spec at spec_path if given).

    options go to `preprocess` (image_size, modality, percentiles, window, threshold, margin,
    spacing, roi, field_of_view). Refuses existing outputs; writes temporary files renamed
    into place at the end, so a failure leaves no output behind. Returns the spec dict. Both
    outputs are owned by this process while it works (cli.exclusive_output)."""
    if spec_path and os.path.abspath(spec_path) == os.path.abspath(output):
        raise PrepareError('--output and --spec are the same file')
    with contextlib.ExitStack() as owned:
        for path in (output, spec_path):
            if path:
                if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                    raise PrepareError('{}: output directory does not exist'.format(path))
                owned.enter_context(cli.exclusive_output(path))
        return _convert(entries, output, spec_path, name, image_type, atlas, subsets, schemes, strict_subsets,
                        progress, options)


def _convert(entries, output, spec_path, name, image_type, atlas, subsets, schemes, strict_subsets, progress,
             options):
    outputs = [p for p in (output, spec_path) if p]
    for path in outputs:
        if os.path.exists(path):
            raise PrepareError('{} exists; refusing to overwrite it'.format(path))
    if not entries:
        raise PrepareError('no scans to convert')
    check_entries(entries)
    if name is None:
        name = os.path.basename(output).split('.')[0]
    ids = [e.id for e in entries]
    image_size = options.get('image_size', DEFAULT_IMAGE_SIZE)
    preprocessing = preprocessing_record(**options)
    spec = build_spec(name, output, spec_path or output, ids, image_size, image_type, atlas,
                      subsets, schemes, (), strict_subsets, preprocessing)

    temporaries = []
    try:
        h5_temporary = _temporary_path(output)
        temporaries.append(h5_temporary)
        label_values = set()
        import h5py
        with h5py.File(h5_temporary, 'w') as h5:
            with cli.progress(len(entries), 'prepare', 'scan', enabled=progress) as bar:
                for entry in entries:
                    label_values |= convert_scan(entry, h5, options)
                    bar.update()
        spec = build_spec(name, output, spec_path or output, ids, image_size, image_type,
                          atlas, subsets, schemes, label_values, strict_subsets, preprocessing)
        if spec_path:
            spec_temporary = _temporary_path(spec_path)
            temporaries.append(spec_temporary)
            with open(spec_temporary, 'w') as f:
                json.dump(spec, f, indent=2)
                f.write('\n')
            os.replace(spec_temporary, spec_path)
            temporaries.remove(spec_temporary)
        os.replace(h5_temporary, output)
        temporaries.remove(h5_temporary)
    finally:
        for path in temporaries:
            if os.path.exists(path):
                os.remove(path)
    return spec


def _key_values(text, option):
    if '=' not in text:
        raise PrepareError('{} {!r}: expected NAME=VALUE[,VALUE...]'.format(option, text))
    key, values = text.split('=', 1)
    values = [v.strip() for v in values.split(',') if v.strip()]
    if not key.strip() or not values:
        raise PrepareError('{} {!r}: expected NAME=VALUE[,VALUE...]'.format(option, text))
    return key.strip(), values


def _parse_schemes(texts):
    schemes = {}
    for text in texts:
        key, parts = _key_values(text, '--scheme')
        schemes[key] = {}
        for part in parts:
            subset, _, fraction = part.partition(':')
            try:
                schemes[key][subset] = float(fraction) if fraction else 1.0
            except ValueError:
                raise PrepareError('--scheme {!r}: bad fraction {!r}'.format(text, fraction))
    return schemes


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        prog='python -m data_util.prepare',
        description='Convert scans (+ label maps, + landmarks) into the HDF5 + JSON dataset '
                    'format: reorient to LPS, crop to the foreground, pad to a cube, resample '
                    'to image_size^3, intensities to uint8 0..255.')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--images', metavar='GLOB',
                        help="image files or DICOM directories, e.g. 'scans/*.nii.gz'")
    source.add_argument('--list', metavar='CSV', help='rows id,image[,label[,landmarks]]')
    source.add_argument('--lpba40', metavar='DIR',
                        help='the LPBA40 layout (fixed.nii.gz, test/, train/, label/): ids '
                             'S01..S40, atlas S01, train S11..S35, val S36..S40, test S02..S10')
    parser.add_argument('--labels', metavar='TEMPLATE',
                        help="with --images: label map path with {id}, e.g. 'seg/{id}.nii.gz'")
    parser.add_argument('--landmarks', metavar='TEMPLATE',
                        help='with --images: landmarks file path with {id} (x,y,z mm LPS rows)')
    parser.add_argument('--id_regex', metavar='REGEX',
                        help='with --images: scan id = first group of REGEX on the file name')
    parser.add_argument('--output', required=True, metavar='OUT.h5')
    parser.add_argument('--spec', metavar='OUT.json', help='also write the JSON dataset spec')
    parser.add_argument('--name', help='the spec\'s file key (default: output name stem)')
    parser.add_argument('--image_type', choices=('brain', 'liver'),
                        help='default: brain for mr, liver for ct')
    parser.add_argument('--ids', metavar='PATTERNS', help='convert only these ids (a,b*,...)')
    parser.add_argument('--atlas', metavar='ID')
    parser.add_argument('--subset', action='append', default=[], metavar='NAME=PATTERNS',
                        help='a subset of ids by fnmatch patterns, e.g. train=S1*,S2* '
                             '(repeatable; default one subset "all")')
    parser.add_argument('--scheme', action='append', default=[],
                        metavar='KEY=SUBSET[:FRACTION],...',
                        help='(repeatable) default: 1=train, 2=val, other subsets by name')
    parser.add_argument('--image_size', type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument('--modality', choices=MODALITIES, default='mr')
    parser.add_argument('--percentiles', type=float, nargs=2, default=DEFAULT_PERCENTILES,
                        metavar=('LOW', 'HIGH'), help='mr: intensity percentiles to 0 and 255')
    parser.add_argument('--window', type=float, nargs=2, default=DEFAULT_CT_WINDOW,
                        metavar=('LEVEL', 'WIDTH'), help='ct: HU window to 0..255')
    parser.add_argument('--threshold', type=float,
                        help='foreground = intensity > THRESHOLD (default Otsu / -500 HU)')
    parser.add_argument('--margin', type=float, default=DEFAULT_MARGIN, help='mm')
    parser.add_argument('--spacing', type=float,
                        help='fixed output voxel size in mm (default: fit the crop box)')
    parser.add_argument('--roi', type=float, nargs=6, metavar=('X0', 'Y0', 'Z0', 'X1', 'Y1', 'Z1'),
                        help='crop box corners in LPS mm instead of the foreground box')
    parser.add_argument('--field_of_view', type=float, metavar='MM',
                        help='a cube of MM mm centred on the foreground centroid instead of the '
                             'foreground box (--lpba40: {:g} unless --spacing or --roi)'.format(
                                 LPBA40_FIELD_OF_VIEW))
    parser.add_argument('--quiet', action='store_true',
                        help='no progress output')
    return parser.parse_args(argv)


def run(args):
    """Carry out parsed command-line arguments; returns the spec dict."""
    if (args.labels or args.landmarks or args.id_regex) and not args.images:
        raise PrepareError('--labels, --landmarks and --id_regex go with --images')
    if args.image_size < 2:
        raise PrepareError('--image_size must be at least 2')
    check_options(args.percentiles, args.window, args.threshold, args.margin, args.field_of_view)
    if args.spacing is not None and not args.spacing > 0:
        raise PrepareError('--spacing must be a positive number of mm')
    if args.field_of_view is not None and (args.spacing is not None or args.roi is not None):
        raise PrepareError('--field_of_view sets the grid alone: give no --spacing or --roi with it')
    if args.lpba40:
        if not os.path.isdir(args.lpba40):
            raise PrepareError('{}: no such directory'.format(args.lpba40))
        entries = lpba40_entries(args.lpba40)
    elif args.list:
        entries = entries_from_list(args.list)
    else:
        entries = entries_from_glob(args.images, args.labels, args.landmarks, args.id_regex)
    if args.ids:
        patterns = [p.strip() for p in args.ids.split(',') if p.strip()]
        keep = set(match_ids(patterns, [e.id for e in entries], '--ids'))
        entries = [e for e in entries if e.id in keep]

    subsets = dict(_key_values(text, '--subset') for text in args.subset) or None
    schemes = _parse_schemes(args.scheme) or None
    atlas, name, strict = args.atlas, args.name, True
    image_type = args.image_type or ('liver' if args.modality == 'ct' else 'brain')
    if args.lpba40:
        atlas = atlas or LPBA40_ATLAS
        name = name or 'lpba'
        strict = subsets is not None
        subsets = subsets or LPBA40_SUBSETS
        if args.field_of_view is None and args.spacing is None and args.roi is None:
            args.field_of_view = LPBA40_FIELD_OF_VIEW
    roi = None if args.roi is None else (args.roi[:3], args.roi[3:])
    return convert(entries, args.output, args.spec, name, image_type, atlas, subsets, schemes,
                   strict_subsets=strict, progress=not args.quiet,
                   image_size=args.image_size, modality=args.modality,
                   percentiles=tuple(args.percentiles), window=tuple(args.window),
                   threshold=args.threshold, margin=args.margin, spacing=args.spacing, roi=roi,
                   field_of_view=args.field_of_view)


def main(argv=None):
    """Command-line entry; returns the exit status (0, or 2 with a one-line error). SIGTERM is
    taken like Ctrl-C: the temporary outputs are removed and one line says so."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, cli._terminate)
    try:
        spec = run(args)
    except (PrepareError, cli.UserError) as e:
        print('error: {}'.format(' '.join(str(e).split())), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('error: interrupted; nothing was written', file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print('error: {}'.format(' '.join(str(e).split())), file=sys.stderr)
        return 2
    count = sum(len(v) for v in spec['subsets'].values())
    print('wrote {} ({} subsets, {} scans in subsets){}'.format(
        args.output, len(spec['subsets']), count,
        ', spec ' + args.spec if args.spec else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
