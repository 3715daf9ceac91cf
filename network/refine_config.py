"""The settings of instance optimisation (network/refine.py), importable without TensorFlow so
that command lines can offer them as flags before anything heavy is loaded."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """factor: the refined field and the loss live on a grid this many times coarser than the
    image (a power of 2); window: LNCC width in voxels of that grid (odd); weight: of the
    diffusion regulariser; learning_rate: Adam's, in voxels of that grid; diffeomorphic: refine a
    stationary velocity integrated by scaling and squaring (squarings steps)."""
    factor: int = 2
    window: int = 5
    weight: float = 1.0
    learning_rate: float = 0.2
    diffeomorphic: bool = False
    squarings: int = 7
