"""runs.py: a run directory's configuration (args.json) and checkpoints, one owner for every reader.

tests/data/args_schema1.json is the args.json that train.py wrote before the schema key existed
(a 2-step LDR run at 64^3 on the synthetic set, written by commit 6863ffe): runs of that format
must keep evaluating, resuming and predicting.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import runs
from conftest import ROOT, error_lines, run_script

OLD_ARGS = os.path.join(ROOT, 'tests', 'data', 'args_schema1.json')


def write_run(directory, settings):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'args.json'), 'w') as f:
        json.dump(settings, f)
    return str(directory)


def old_settings():
    with open(OLD_ARGS) as f:
        return json.load(f)


def test_schema1_file_loads_with_every_setting_and_saves_as_schema2(tmp_path):
    config = runs.RunConfig.load(write_run(tmp_path / 'old', old_settings()))
    assert (config.base_network, config.n_cascades, config.rep, config.image_size) == ('LDR', 1, 1, [64, 64, 64])
    assert config.net_options == {} and config.preprocessing is None and not config.is_aldk
    assert config.get('seed') == old_settings()['seed'] and config.get('dataset') == 'synthetic/synthetic.json'
    config.save(str(tmp_path / 'old'))
    saved = json.loads((tmp_path / 'old' / 'args.json').read_text())
    assert saved.pop('schema') == runs.SCHEMA == 2
    assert saved == old_settings()


def test_cascade_args_are_the_runs_architecture_with_overrides(tmp_path):
    settings = dict(old_settings(), net_args="channels=8, flow_multiplier=0.5", rep=2)
    config = runs.RunConfig.load(write_run(tmp_path / 'run', settings))
    args = config.cascade_args()
    assert (args['base_network'], args['n_cascades'], args['rep']) == ('LDR', 1, 2)
    assert args['flow_multiplier'] == 0.5 and args['base_args'] == {'channels': 8}
    assert config.cascade_args(rep=3, extra={'flow_multiplier': 1.0})['flow_multiplier'] == 1.0
    assert config.cascade_args(rep=3)['rep'] == 3


@pytest.mark.parametrize('stored, read', [(64, [64, 64, 64]), ([32], [32, 32, 32]), ([32, 48, 64], [32, 48, 64])])
def test_image_size_of_any_stored_form_reads_as_three_sizes(tmp_path, stored, read):
    config = runs.RunConfig.load(write_run(tmp_path / 'run', dict(old_settings(), image_size=stored)))
    assert config.image_size == read


@pytest.mark.parametrize('settings, message', [
    ([], 'holds a list'),
    ({'base_network': 'LDR'}, 'lacks n_cascades, image_size'),
    ({'base_network': 'LDR', 'n_cascades': 1, 'image_size': [64, 64]}, 'image_size [64, 64]'),
    ({'base_network': 'LDR', 'n_cascades': 1, 'image_size': 64, 'schema': 9}, 'schema 9, newer'),
])
def test_files_that_are_not_a_runs_settings_are_named(tmp_path, settings, message):
    with pytest.raises(runs.UserError) as e:
        runs.RunConfig.load(write_run(tmp_path / 'run', settings))
    assert message in str(e.value) and 'args.json' in str(e.value)


def test_equivalent_architecture_flags_are_accepted_and_others_refused(tmp_path):
    config = runs.RunConfig.load(write_run(tmp_path / 'run', dict(old_settings(), net_args="channels=8")))

    class Flags:
        base_network, n_cascades, rep, dataset = 'LDR', 1, None, None
        image_size = [64]                      # --image_size 64 == [64, 64, 64]
        net_args = "channels = 8"              # same options, other spelling
    config.apply_architecture(Flags)
    assert (Flags.image_size, Flags.net_args, Flags.rep) == ([64, 64, 64], 'channels=8', 1)
    for key, value in (('image_size', [32]), ('net_args', 'channels=16'), ('n_cascades', 3), ('base_network', 'VTN')):
        given = dict(base_network=None, n_cascades=None, rep=None, net_args='', image_size=None, dataset=None)
        given[key] = value
        flags = type('Flags', (), given)
        with pytest.raises(runs.UserError) as e:
            config.apply_architecture(flags)
        assert '--{} '.format(key) in str(e.value) and 'contradicts' in str(e.value)


def test_run_module_needs_no_tensorflow():
    code = 'import sys, runs; runs.RunConfig; assert "tensorflow" not in sys.modules, "tensorflow imported"'
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def old_run(tiny_run, synthetic_spec, tmp_path):
    """The tiny run's checkpoint under the args.json of before the schema key, in a project-like
    directory whose synthetic/ holds the data set its args.json names."""
    shutil.copytree(tiny_run, tmp_path / 'weights' / 'old')
    shutil.copy(OLD_ARGS, tmp_path / 'weights' / 'old' / 'args.json')
    (tmp_path / 'synthetic').symlink_to(os.path.dirname(synthetic_spec))
    return tmp_path


def test_run_of_the_old_format_evaluates_predicts_and_resumes(old_run):
    proc = run_script('eval.py', '-c', 'weights/old', '-v', 'test', cwd=old_run)
    assert proc.returncode == 0, error_lines(proc)
    report = json.loads((old_run / 'evaluate' / 'old-2-test.json').read_text())
    assert report['rep'] == 1 and len(report['pairs']) > 0

    scan = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 200, (40, 40, 40)).astype(np.float32))
    sitk.WriteImage(scan, str(old_run / 'scan.nii.gz'))
    proc = run_script('predict.py', '-c', 'weights/old', '--fixed', 'scan.nii.gz', '--moving', 'scan.nii.gz',
                      '-o', 'registered', cwd=old_run)
    assert proc.returncode == 0, error_lines(proc)
    assert (old_run / 'registered' / 'warped.nii.gz').exists()

    proc = run_script('train.py', '-c', 'weights/old', '--epochs', '2', '--image_size', '64', cwd=old_run)
    assert proc.returncode == 0, error_lines(proc)
    assert 'step 4/4' in proc.stdout
    assert max(runs.list_checkpoints(str(old_run / 'weights' / 'old'))) == 4
    resumed = json.loads((old_run / 'weights' / 'old' / 'args.json').read_text())
    assert resumed.pop('schema') == 2
    assert resumed == dict(old_settings(), epochs=2.0, checkpoint='weights/old', output=None, init_from=None,
                              warmup=None, augment_gamma=None)


@pytest.mark.parametrize('old, new, factors', [
    ([1, 1, 1, 8, 9], [2, 2, 2, 8, 9], (2, 2, 2)), ([1, 2, 1, 8, 9], [3, 4, 2, 8, 9], (3, 2, 2)),
    ([2, 2, 2, 8, 9], [3, 3, 3, 8, 9], None), ([1, 1, 1, 8, 9], [2, 2, 2, 16, 9], None),
    ([1, 1, 1, 8, 9], [1, 1, 1, 8, 9], None), (None, [2, 2, 2, 8, 9], None), ([4, 9], [8, 9], None)])
def test_kernel_growth_is_integer_spatial_factors_with_the_same_channels(old, new, factors):
    assert runs.kernel_growth(old, new) == factors


def test_init_from_a_run_at_another_image_size_keeps_what_fits(tiny_run, tmp_path):
    """Coarse-to-fine: an 80^3 run starts from the 64^3 tiny run. Every variable is taken over,
    the light affine stem's two heads (their kernels span the whole feature map: 1^3 at 64^3,
    2^3 at 80^3) resampled: each stored kernel cell repeated over a 2^3 block and divided by 8,
    so that the coarse map upsampled gives the same W and b; with a learning rate of 1e-12 two
    Adam steps leave every variable equal to that."""
    from data_util.synthetic import make_synthetic
    from network.tfv1 import tf
    spec = make_synthetic(str(tmp_path / 'synthetic80'), n_scans=6, image_size=80, seed=1)
    proc = run_script('train.py', '-d', spec, '--init_from', tiny_run, '--round', '2', '--epochs', '1', '--batch', '1',
                      '--lr', '1e-12', '--output', 'fine', '--val_steps', '0', cwd=tmp_path)
    assert proc.returncode == 0, error_lines(proc)
    line = next(line for line in proc.stdout.splitlines() if line.startswith('Initialised from'))
    assert line.endswith('26 of 26 variables; resampled to this size (kernels spanning the feature map): '
                         '{0}/conv7_W/W, {0}/conv7_b/W'.format('rcn/affine_stem')), line
    settings = json.loads((tmp_path / 'weights' / 'fine' / 'args.json').read_text())
    assert settings['base_network'] == 'LDR' and settings['image_size'] == [80, 80, 80]
    source = tf.train.load_checkpoint(runs.resolve_checkpoint(str(tiny_run))[1])
    started = tf.train.load_checkpoint(runs.resolve_checkpoint(str(tmp_path / 'weights' / 'fine'))[1])
    shapes = source.get_variable_to_shape_map()
    taken = [n for n, shape in started.get_variable_to_shape_map().items()
             if n.startswith('rcn/') and 'Adam' not in n and shapes.get(n) == shape]
    assert len(taken) > 10
    for name in taken:
        np.testing.assert_allclose(started.get_tensor(name), source.get_tensor(name), rtol=0, atol=1e-9)
    features = np.random.default_rng(0).normal(size=[1, 1, 1, 128])   # the 64^3 stem's last map
    for head in ('conv7_W', 'conv7_b'):
        name = 'rcn/affine_stem/{}/W'.format(head)
        coarse, fine = source.get_tensor(name), started.get_tensor(name)
        assert coarse.shape[:3] == (1, 1, 1) and fine.shape[:3] == (2, 2, 2)
        np.testing.assert_allclose(fine, np.broadcast_to(coarse / 8, fine.shape), rtol=0, atol=1e-9)
        upsampled = np.broadcast_to(features, [2, 2, 2, 128])
        np.testing.assert_allclose(np.einsum('xyzc,xyzco->o', upsampled, fine),
                                   np.einsum('xyzc,xyzco->o', features, coarse), rtol=0, atol=1e-7)

    proc = run_script('train.py', '-c', tiny_run, '--init_from', tiny_run, cwd=tmp_path)
    assert proc.returncode != 0 and error_lines(proc) == [
        'error: -c continues a run and --init_from starts a new one from its weights: choose one']
