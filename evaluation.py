"""Evaluation records: the metrics of a registered pair and their summaries, one path for
eval.py (networks) and baselines/evaluate.py (ANTs, Elastix, identity).

A pair's record: 'id1' (fixed), 'id2' (moving), 'dice', 'jacc' (mean over the classes),
'dices', 'jaccs' (per class), the same on the preprocessed grid as 'dice_grid', 'jacc_grid',
'dices_grid', 'jaccs_grid', 'overlap_on' ('original' or 'grid'), 'landmark_dist' (voxels of
the grid), 'jacobian_det' (std of the Jacobian determinant), 'folding' (fraction of voxels
with det <= 0) and 'seconds' (registration time per pair).

Where the scans are met: when the dataset's HDF5 groups carry their original geometry and label
maps (data_util.prepare writes both), Dice and Jaccard are measured on the FIXED scan's original
grid, with the moving label map pulled through the displacement field exactly as predict.py
does (data_util.geometry.original_overlap), so evaluation and predict.py give the same
numbers for the same pair. Without them (e.g. the original's HDF5 files) they are those of the
preprocessed grid.

What registers the pairs: a train.py checkpoint's evaluation graph (`FrameworkEvaluator`: flows
and metrics in one graph), or any network with ``flow(fixed, moving)`` such as an export of
predict.py (`NetworkEvaluator`), whose metrics come from `MetricGraph`, the same
network/metrics.py functions in a small graph of their own (as for the classical baselines).
"""
import numpy as np

METRICS = ('dice', 'jacc', 'dice_grid', 'jacc_grid', 'landmark_dist', 'jacobian_det', 'folding')


def nanmean(values):
    values = np.asarray(values, np.float64)
    return float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else float('nan')


def nanstd(values):
    values = np.asarray(values, np.float64)
    return float(np.std(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else float('nan')


def overlap_values(class_values, class_names):
    """The label values measured on the original grids, in class order (None: every non-zero
    value of the fixed label map, for specs without segmentation_class_value)."""
    if not class_names:
        return None
    return [int(class_values[name]) for name in class_names]


def original_metrics(dataset, fixed_id, moving_id, flow, values):
    """{'dices', 'jaccs'} of a pair on the fixed scan's original grid, or None when either
    scan lacks its original geometry or label map (see Dataset.original)."""
    from data_util.geometry import original_overlap
    fixed, moving = dataset.original(fixed_id), dataset.original(moving_id)
    if fixed is None or moving is None:
        return None
    if values is None:
        values = sorted(int(v) for v in np.unique(fixed[1]) if v)
    dices, jaccs = original_overlap(flow, fixed, moving, values)
    return {'dices': dices, 'jaccs': jaccs}


def pair_record(dataset, batch, i, res, flow, seconds, values):
    """The record of pair i of a batch: res holds the graph's metrics of the batch
    (network.metrics: 'dices', 'jaccs', 'landmark_dists', 'jacobian_det', 'folding'), flow
    [N, N, N, 3] is the pair's flow, values as `overlap_values`."""
    grid = {'dices': [float(v) for v in res['dices'][i]], 'jaccs': [float(v) for v in res['jaccs'][i]]}
    original = original_metrics(dataset, batch['id1'][i], batch['id2'][i], flow, values)
    overlap = original or grid
    return {'id1': str(batch['id1'][i]), 'id2': str(batch['id2'][i]),
            'dice': nanmean(overlap['dices']), 'jacc': nanmean(overlap['jaccs']),
            'dice_grid': nanmean(grid['dices']), 'jacc_grid': nanmean(grid['jaccs']),
            'overlap_on': 'original' if original else 'grid',
            'landmark_dist': nanmean(res['landmark_dists'][i]),
            'jacobian_det': float(res['jacobian_det'][i]), 'folding': float(res['folding'][i]),
            'dices': overlap['dices'], 'jaccs': overlap['jaccs'],
            'dices_grid': grid['dices'], 'jaccs_grid': grid['jaccs'],
            'seconds': float(seconds)}


class MetricGraph:
    """network/metrics.py on one pair: feeds seg1, seg2 [1,X,Y,Z,1], points [1,K,3], flow [1,X,Y,Z,3].

    image_size [X, Y, Z]; class_values as Framework's (None: 0/255 masks); threads: the
    session's intra- and inter-op pool sizes (0: TensorFlow's choice).
    """

    def __init__(self, image_size, class_values, threads):
        from network import metrics
        from network.tfv1 import tf
        self.graph = tf.Graph()
        with self.graph.as_default():
            shape = [1] + list(image_size)
            self.feeds = {'seg1': tf.placeholder(tf.float32, shape + [1]), 'seg2': tf.placeholder(tf.float32, shape + [1]),
                          'point1': tf.placeholder(tf.float32, [1, None, 3]),
                          'point2': tf.placeholder(tf.float32, [1, None, 3]),
                          'flow': tf.placeholder(tf.float32, shape + [3])}
            f = self.feeds
            dice, jacc = metrics.segmentation_overlap(f['seg1'], f['seg2'], f['flow'], class_values)
            jac_std, folding = metrics.jacobian_stats(f['flow'])
            self.outputs = {'dices': dice, 'jaccs': jacc, 'jacobian_det': jac_std, 'folding': folding,
                            'landmark_dists': metrics.landmark_distances(f['point1'], f['point2'], f['flow'])}
            self.session = tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=threads,
                                                            inter_op_parallelism_threads=threads))

    def __call__(self, batch, flow):
        """Metrics of one pair (batch of 1 from Dataset.generator, flow [X,Y,Z,3]) as NumPy arrays
        with a leading axis of 1."""
        fd = {self.feeds[k]: batch[k] for k in ('seg1', 'seg2', 'point1', 'point2')}
        fd[self.feeds['flow']] = flow[None]
        return self.session.run(self.outputs, fd)


class FrameworkEvaluator:
    """A checkpoint's evaluation Framework (runs.load_framework) in its session."""

    def __init__(self, sess, framework):
        self.sess, self.framework = sess, framework

    def register(self, batch):
        """Flows [B, X, Y, Z, 3] of a Dataset batch."""
        return self.framework.register(self.sess, batch)

    def metrics(self, batch, flow):
        """network/metrics.py's metrics of a batch and its flows, arrays with a leading axis B."""
        return self.framework.evaluate_batch(self.sess, batch, flow=flow)

    def close(self):
        self.sess.close()


class NetworkEvaluator:
    """A network with ``flow(fixed, moving)`` ([X,Y,Z] in 0..255 -> [X,Y,Z,3]) and a MetricGraph."""

    def __init__(self, network, metric_graph):
        self.network, self.metric_graph = network, metric_graph

    def register(self, batch):
        return np.stack([self.network.flow(fixed[..., 0], moving[..., 0])
                         for fixed, moving in zip(batch['voxel1'], batch['voxel2'])])

    def metrics(self, batch, flow):
        pairs = [self.metric_graph({k: batch[k][i:i + 1] for k in ('seg1', 'seg2', 'point1', 'point2')}, flow[i])
                 for i in range(len(flow))]
        return {k: np.concatenate([pair[k] for pair in pairs]) for k in pairs[0]}

    def close(self):
        self.metric_graph.session.close()


def summarize(records, class_names):
    """Mean and std of every metric over pairs, per-class means, median seconds per pair."""
    summary = {m: {'mean': nanmean([r[m] for r in records]), 'std': nanstd([r[m] for r in records])}
               for m in METRICS}
    summary['seconds_per_pair'] = float(np.median([r['seconds'] for r in records]))
    if all('seconds_refine' in r for r in records):
        summary['seconds_refine_per_pair'] = float(np.median([r['seconds_refine'] for r in records]))
        summary['seconds_per_iteration'] = float(np.median([r['refinement']['seconds_per_iteration'] for r in records]))
    per_class = {}
    if class_names:
        for k, name in enumerate(class_names):
            per_class[name] = {'dice': nanmean([r['dices'][k] for r in records]),
                               'jacc': nanmean([r['jaccs'][k] for r in records])}
    return summary, per_class


def report_text(records, summary):
    """The original's text format: 'id1 id2 dice jacc landmark jacobian' lines, then Summary."""
    lines = ['{} {} {} {} {} {}'.format(r['id1'], r['id2'], r['dice'], r['jacc'], r['landmark_dist'],
                                        r['jacobian_det']) for r in records]
    s = summary
    lines += ['Summary',
              'Dice score: {} ({})'.format(s['dice']['mean'], s['dice']['std']),
              'Jacc score: {} ({})'.format(s['jacc']['mean'], s['jacc']['std']),
              'Landmark distance: {} ({})'.format(s['landmark_dist']['mean'], s['landmark_dist']['std']),
              'Jacobian determinant: {} ({})'.format(s['jacobian_det']['mean'], s['jacobian_det']['std']),
              'Folding fraction: {} ({})'.format(s['folding']['mean'], s['folding']['std']),
              'Seconds per pair: {}'.format(s['seconds_per_pair'])]
    return '\n'.join(lines) + '\n'
