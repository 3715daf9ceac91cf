"""Preview pictures of a registration: mid slices of the fixed, the moving, the warped image, a
checkerboard of fixed and warped, and the displacement magnitude.

`write(directory, ...)` writes preview.png (all five rows: axial, coronal and sagittal mid
slices in radiological view) and one file per row (FILES), drawn with Pillow on one scale of
pixels per mm. Images are sitk.Images on the fixed grid (the moving one for its own intensity
window), the field a numpy [nz, ny, nx, 3] in mm.
"""
import itertools
import os

import numpy as np

ROWS = ('fixed', 'moving', 'warped', 'checkerboard', 'flow')
FILES = ['preview.png'] + ['preview_{}.png'.format(name) for name in ROWS]
VIEWS = ('axial', 'coronal', 'sagittal')
CHECKER_TILES = 8


def display_axes(direction):
    """(perm, flip) so that array axis perm[w] is the one closest to world axis w (L, P, S)
    and flip[w] tells whether it runs the opposite way."""
    matrix = np.abs(np.reshape(direction, (3, 3)))
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(matrix[w, p[w]] for w in range(3)))
    signs = np.reshape(direction, (3, 3))
    return list(perm), [bool(signs[w, perm[w]] < 0) for w in range(3)]


def mid_slices(volume, perm, flip):
    """Axial, coronal and sagittal mid slices of a [X, Y, Z] (or [X, Y, Z, C]) array.

    The volume is reoriented (permute + flip, no interpolation) so its axes run to L, P, S.
    Returns three 2-D arrays (magnitude over C for vectors) laid out for display: axial
    rows P (anterior up) x cols L (patient right on the left, radiological), coronal and
    sagittal rows S (superior up; flipped so row 0 is superior) x cols L resp. P.
    """
    volume = np.transpose(volume, perm + list(range(3, volume.ndim)))
    for w in range(3):
        if flip[w]:
            volume = np.flip(volume, w)
    nl, np_, ns = volume.shape[:3]
    slices = [volume[:, :, ns // 2].swapaxes(0, 1), volume[:, np_ // 2, :].swapaxes(0, 1)[::-1],
              volume[nl // 2, :, :].swapaxes(0, 1)[::-1]]
    slices = [np.asarray(s, np.float64) for s in slices]
    if volume.ndim == 4:
        slices = [np.linalg.norm(s, axis=-1) for s in slices]
    return slices


def slice_extents(spacing, shape, perm):
    """Extents (left, right, bottom, top) in mm of the three mid_slices views."""
    sl, sp, ss = (spacing[perm[w]] * shape[perm[w]] for w in range(3))
    return [(0, sl, sp, 0), (0, sl, ss, 0), (0, sp, ss, 0)]


def intensity_window(array, modality, percentiles, window):
    """(low, high) display window: the CT window, or the MR percentiles of a subsample."""
    if modality == 'ct':
        return window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
    stride = max(1, int(round((array.size / 2e6) ** (1 / 3))))
    sample = np.asarray(array[::stride, ::stride, ::stride], np.float64)
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    return low, max(high, low + 1e-6)


def checkerboard(fixed, warped, extent):
    """CHECKER_TILES tiles along the longer side of a 2-D slice: fixed and warped (both 0..1) alternate."""
    rows, cols = fixed.shape
    width, height = abs(extent[1] - extent[0]), abs(extent[2] - extent[3])
    tile = max(width, height) / CHECKER_TILES
    row_tile = (np.arange(rows) + 0.5) * height / rows // tile
    col_tile = (np.arange(cols) + 0.5) * width / cols // tile
    mask = (row_tile[:, None] + col_tile[None, :]) % 2 == 0
    return np.where(mask, fixed, warped)


PANEL_HEIGHT = 220      # pixels of the tallest view
GAP = 8                 # pixels between views and between rows
TITLE_HEIGHT = 16       # pixels above a row's views
BAR_WIDTH = 70          # pixels right of the views: the colour bar of the flow row


def colour_map(fractions):
    """A black-red-yellow-white ramp ("hot"): fractions in 0..1 -> uint8 RGB [..., 3]."""
    rgb = np.clip(3.0 * np.asarray(fractions, np.float64)[..., None] - np.arange(3.0), 0.0, 1.0)
    return np.round(255.0 * rgb).astype(np.uint8)


def panel(image, size, window, colour):
    """A 2-D slice as a PIL image of ``size`` (width, height) pixels: the window (low, high)
    mapped to black..white (or the colour map), nearest neighbour."""
    from PIL import Image
    fractions = np.clip((np.asarray(image, np.float64) - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    levels = np.round(255.0 * fractions).astype(np.uint8)
    picture = Image.fromarray(colour_map(levels / 255.0) if colour else levels)
    return picture.resize(size, Image.NEAREST)


def colour_bar(height, high, font):
    """The flow row's colour bar: BAR_WIDTH x height pixels, 0 at the bottom, ``high`` (mm) at the top."""
    from PIL import Image, ImageDraw
    bar = Image.new('RGB', (BAR_WIDTH, height), 'white')
    ramp = colour_map(np.linspace(1.0, 0.0, height))
    bar.paste(Image.fromarray(np.repeat(ramp[:, None], 12, axis=1)), (4, 0))
    draw = ImageDraw.Draw(bar)
    for fraction in (0.0, 0.5, 1.0):
        y = int(round((1.0 - fraction) * (height - 1)))
        draw.line([(16, y), (19, y)], fill='black')
        draw.text((21, min(max(y - 6, 0), height - 13)), '{:.3g}'.format(fraction * high), fill='black', font=font)
    draw.text((21, height // 2 + 14), 'mm', fill='black', font=font)
    return bar


def write_previews(directory, rows, extents):
    """preview.png (all rows) and preview_<name>.png (one row each).

    rows: [(name, title, [3 slices], (low, high) window, colour)], extents: the three views'
    (left, right, bottom, top) in mm; every view on one scale of pixels per mm.
    """
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=11)
    scale = PANEL_HEIGHT / max(abs(e[2] - e[3]) for e in extents)
    sizes = [(max(1, int(round(abs(e[1] - e[0]) * scale))), max(1, int(round(abs(e[2] - e[3]) * scale))))
             for e in extents]
    width = sum(w for w, _ in sizes) + GAP * (len(sizes) + 1) + BAR_WIDTH
    height = TITLE_HEIGHT + max(h for _, h in sizes) + GAP
    pictures = []
    for name, title, slices, window, colour in rows:
        picture = Image.new('RGB', (width, height), 'white')
        draw = ImageDraw.Draw(picture)
        x = GAP
        for image, size, view in zip(slices, sizes, VIEWS):
            picture.paste(panel(image, size, window, colour), (x, TITLE_HEIGHT))
            draw.text((x + size[0] // 2, TITLE_HEIGHT // 2), '{} - {}'.format(title, view), fill='black', font=font,
                      anchor='mm')
            x += size[0] + GAP
        if colour:
            picture.paste(colour_bar(max(h for _, h in sizes), window[1], font), (x, TITLE_HEIGHT))
        picture.save(os.path.join(directory, 'preview_{}.png'.format(name)))
        pictures.append(picture)
    combined = Image.new('RGB', (width, height * len(pictures)), 'white')
    for i, picture in enumerate(pictures):
        combined.paste(picture, (0, i * height))
    combined.save(os.path.join(directory, 'preview.png'))


def preview_rows(fixed, moving_on_fixed, warped, field, moving, options):
    """The five preview rows (see write_previews) from images on the fixed grid."""
    import SimpleITK as sitk

    def xyz(image):
        return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)

    perm, flip = display_axes(fixed.GetDirection())
    extents = slice_extents(fixed.GetSpacing(), fixed.GetSize(), perm)
    fixed_window, moving_window = [intensity_window(xyz(image), options['modality'], options['percentiles'],
                                                    options['window']) for image in (fixed, moving)]
    fixed_slices = mid_slices(xyz(fixed), perm, flip)
    warped_slices = mid_slices(xyz(warped), perm, flip)

    def scaled(slices, window):
        return [np.clip((s - window[0]) / (window[1] - window[0]), 0, 1) for s in slices]

    checker = [checkerboard(f, w, e) for f, w, e in zip(scaled(fixed_slices, fixed_window),
                                                         scaled(warped_slices, moving_window), extents)]
    flow_slices = mid_slices(field.transpose(2, 1, 0, 3), perm, flip)
    rows = [('fixed', 'fixed', fixed_slices, fixed_window, False),
            ('moving', 'moving (before)', mid_slices(xyz(moving_on_fixed), perm, flip), moving_window, False),
            ('warped', 'warped moving', warped_slices, moving_window, False),
            ('checkerboard', 'checkerboard', checker, (0.0, 1.0), False),
            ('flow', '|u| (mm)', flow_slices, (0.0, max(float(max(s.max() for s in flow_slices)), 1e-6)), True)]
    return rows, extents


def write(directory, fixed, moving_on_fixed, warped, field, moving, options):
    """All preview files into ``directory``; options: the pair's preprocessing (intensity windows)."""
    rows, extents = preview_rows(fixed, moving_on_fixed, warped, field, moving, options)
    write_previews(directory, rows, extents)
