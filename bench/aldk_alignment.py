"""Where the ALDK critic pushes a student's flows, pair by pair; prints a Markdown table.

Usage: ``python -m bench.aldk_alignment --critic RUN -d SPEC --flows STORE [-v val,test] STUDENT [STUDENT ...]``

For each held-out pair (every pair of the -v subsets, as eval.py forms them) and each student
run, with the critic restored from the ALDK run --critic (its beta, gamma, lamb and units from
that run's args.json) and the teacher's flow phi_t read from the --flows store
(``eval.py --writing_flow``), it takes the student's flow phi_s and the gradients of the two
terms of the student loss with respect to phi_s (the signal each term sends into the network):
  - adversarial: L_adv = -mean D(beta phi_t + (1 - beta) phi_s);
  - reconstruction: L_rec, the unsupervised RCN loss.
Reported per student, as mean +- std over the pairs: the cosine between each term's descent
direction (-gradient) and the direction to the teacher's flow (phi_t - phi_s); the ratio of
their norms as weighted in the loss ((1 - gamma) |dL_adv| / (gamma |dL_rec|)); and the
end-point error |phi_s - phi_t| (voxels). Two random directions in X*Y*Z*3 dimensions have a
cosine of about 0 +- 1 / sqrt(X*Y*Z*3) (0.001 at 64^3): a positive mean says the term pulls
the flow towards the teacher's flow of that very pair, not only towards the teacher's
distribution of flows.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cli  # noqa: E402
import runs  # noqa: E402


def cosine(a, b):
    """Cosine of the angle between two arrays taken as flat vectors (0 if either is zero)."""
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.sum(a * b) / norm) if norm > 0 else 0.0


def alignment(student, critic_run, dataset, store, subsets):
    """Per-pair rows (cos adversarial, cos reconstruction, weighted norm ratio, EPE) of one student run."""
    from network.aldk import DEFAULTS, DistillFramework
    from network.framework import session_config
    from network.tfv1 import tf
    critic = critic_run.config
    run = runs.Run(student)
    if run.config.image_size != critic.image_size:
        raise cli.UserError('{} was trained at {} but the critic at {}'.format(
            run.directory, 'x'.join(map(str, run.config.image_size)), 'x'.join(map(str, critic.image_size))))
    rows = []
    with tf.Graph().as_default():
        fw = DistillFramework(run.config.cascade_args(), run.config.image_size, dataset.segmentation_class_value,
                              augment=False, method='aldk', stored_flows=True, beta=critic.get('beta'),
                              gamma=critic.get('gamma'), lamb=critic.get('lamb'),
                              critic_units=critic.get('critic_units', DEFAULTS.critic_units))
        if fw.gamma == 0:
            raise cli.UserError('the critic run has gamma = 0: its student loss has no reconstruction term')
        phi_s = fw.tower_flows[0]['student']
        adversarial = tf.gradients(fw.terms['adversarial'], phi_s)[0]
        total = tf.gradients(fw.loss, phi_s)[0]  # gamma dL_rec + (1 - gamma) dL_adv
        with tf.Session(config=session_config(fw.devices)) as sess:
            sess.run(tf.global_variables_initializer())
            runs.restore_variables(sess, run.prefix, fw.net.variables)
            runs.restore_variables(sess, critic_run.prefix, fw.critic.variables)
            for subset in subsets:
                for batch in dataset.generator(subset, batch_size=1):
                    phi_t = store.flow(batch['id1'][0], batch['id2'][0])
                    batch['teacher_flow'] = phi_t[None]
                    flow, g_adv, g_total = sess.run([phi_s, adversarial, total], fw.feed_dict(batch))
                    weighted_adv = (1 - fw.gamma) * g_adv
                    weighted_rec = g_total - weighted_adv
                    to_teacher = phi_t - flow[0]
                    rows.append((cosine(-g_adv[0], to_teacher), cosine(-weighted_rec[0], to_teacher),
                                 np.linalg.norm(weighted_adv) / max(np.linalg.norm(weighted_rec), 1e-30),
                                 float(np.mean(np.linalg.norm(to_teacher, axis=-1)))))
    if not rows:
        raise cli.UserError('no pairs in subset(s) {}'.format(', '.join(subsets)))
    return np.array(rows)


def mean_std(values, digits):
    return '{0:.{2}f} +- {1:.{2}f}'.format(np.mean(values), np.std(values), digits)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('students', nargs='+', help='student run directories (or DIR:STEP / prefixes)')
    parser.add_argument('--critic', required=True, help='the ALDK run whose critic is used')
    parser.add_argument('-d', '--dataset', required=True, help='JSON dataset spec')
    parser.add_argument('--flows', required=True, help='HDF5 store of the teacher\'s flows (eval.py --writing_flow)')
    parser.add_argument('-v', '--subsets', default='val,test', help='comma-separated subsets (default val,test)')
    args = parser.parse_args(argv)
    from data_util.dataset import Dataset
    from data_util.flow_store import FlowStore
    critic_run = runs.Run(args.critic)
    if not critic_run.config.is_aldk:
        raise cli.UserError('{} is not an ALDK run (no --aldk in its args.json): it has no critic'.format(
            critic_run.directory))
    dataset = Dataset(args.dataset, batch_size=1)
    subsets = [s for s in args.subsets.split(',') if s]
    print('Critic of {}; teacher flows {}; subsets {}'.format(critic_run.prefix, args.flows, ', '.join(subsets)))
    print()
    print('| student | pairs | cos(adversarial, to teacher) | cos(reconstruction, to teacher) '
          '| weighted norm adv / rec | EPE (voxels) |')
    print('|---|---:|---:|---:|---:|---:|')
    with FlowStore(args.flows, critic_run.config.image_size) as store:
        for student in args.students:
            rows = alignment(student, critic_run, dataset, store, subsets)
            print('| {} | {} | {} | {} | {:.3f} | {:.3f} |'.format(
                student, len(rows), mean_std(rows[:, 0], 4), mean_std(rows[:, 1], 4), np.mean(rows[:, 2]),
                np.mean(rows[:, 3])))


if __name__ == '__main__':
    cli.run(main)
