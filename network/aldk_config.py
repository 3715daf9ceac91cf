"""The settings of distillation (network/aldk.py), importable without TensorFlow so that
train.py can offer them as flags, with these defaults, before anything heavy is loaded."""
import dataclasses

CRITIC_UNITS = ('normalized', 'rms', 'voxels')


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """beta: phi_d = beta phi_t + (1 - beta) phi_s; gamma: student loss gamma L_rec + (1 - gamma)
    L_distill; lamb: weight of the critic's gradient penalty (SPEC section 5 gives all three);
    critic_every: the critic is updated every critic_every-th step (the student every step);
    critic_lr_factor: critic / student learning-rate ratio; critic_units: the metric of the
    gradient penalty, one of CRITIC_UNITS (see network.aldk.Critic)."""
    beta: float = 0.1
    gamma: float = 0.3
    lamb: float = 0.1
    critic_every: int = 2
    critic_lr_factor: float = 1.0
    critic_units: str = 'normalized'
