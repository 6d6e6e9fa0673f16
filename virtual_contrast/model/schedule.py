"""The step size over a training run: learning-rate schedule and the guard against divergence.

The paper trains with plain Adam at its default learning rate (1e-3) for 300 epochs. Two additions, both
reachable from the configuration:

* ``lr_schedule="poly"``: nnU-Net's polynomial decay, lr (1 - epoch / epochs)^0.9, a departure from the paper
  for short schedules, where the last epochs should settle rather than keep jumping around the minimum.
* The divergence guard (:class:`DivergenceGuard`). A network whose output goes through a sigmoid can be thrown,
  by one large Adam step, into a state where the sigmoid is saturated over the whole volume: its gradient then
  vanishes and the loss stays at the value of a constant image for good (a demo fold went from 0.001 to 0.2 at
  epoch 82 and never came back). Gradient-norm clipping (nnU-Net's 12, ``grad_clip``) bounds one batch's
  gradient, but Adam's step is invariant to the gradient's scale, so clipping alone does not prevent this
  (measured: at learning rates 0.03 and 0.3 on toy volumes the run collapsed the same with and without
  clipping). The guard looks at each epoch: when its training loss is not finite or exceeds ``factor`` times
  the best training loss so far, or when the network's sigmoid on a training volume is saturated (its output
  within 1e-3 of the sigmoid's range, [0, ceiling], from either end) over more than half of the brain, the epoch is undone (weights and optimiser state back to
  the end of the epoch with the best training loss: a collapse can build up over a few epochs) and the
  learning rate is halved for the rest of the run; after
  ``max_halvings`` the run stops with an error rather than producing a collapsed model. (The reference lies
  far below the ceiling, :data:`~virtual_contrast.model.unet.OUTPUT_CEILING`, so a healthy network saturates
  nowhere; before issue 25 the reference was clipped at the sigmoid's top, and saturated on about 2 % of the
  brain.)
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from virtual_contrast.io import InputError
from virtual_contrast.model.config import LR_SCHEDULES

log = logging.getLogger(__name__)

#: An output within this fraction of the sigmoid's range from either end counts as saturated; the guard undoes
#: an epoch after which more than SATURATED_BRAIN_FRACTION of the brain is.
SATURATION_EPS = 1e-3
SATURATED_BRAIN_FRACTION = 0.5


def saturated_fraction(pred: torch.Tensor, mask: torch.Tensor, ceiling: float = 1.0) -> float:
    """Fraction of the ``mask`` voxels where the sigmoid output ``pred``, in [0, ``ceiling``], is saturated
    (see SATURATION_EPS)."""
    p = pred.float() / ceiling
    saturated = (p < SATURATION_EPS) | (p > 1 - SATURATION_EPS)
    m = mask > 0.5
    return float(saturated[m].float().mean()) if bool(m.any()) else float(saturated.float().mean())


def learning_rate_at(base: float, schedule: str, epoch: int, epochs: int) -> float:
    """Learning rate of the 0-based ``epoch`` of ``epochs``: ``base``, or ``base (1 - epoch/epochs)^0.9``."""
    if schedule not in LR_SCHEDULES:
        raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "poly":
        return base * (1 - epoch / epochs) ** 0.9
    return base


class DivergenceGuard:
    """Undo an epoch whose training loss blew up and halve the learning rate (see the module docstring).

    ``factor`` 0 turns the guard off. Call :meth:`remember` before the first epoch and after each epoch
    with a new best training loss, :meth:`diverged` after each epoch, and :meth:`roll_back` when it says so.
    :meth:`state_dict` / :meth:`load_state_dict` carry everything (the remembered weights included) through a
    checkpoint, so a resumed run continues exactly as an uninterrupted one.
    """

    def __init__(self, factor: float, max_halvings: int = 10) -> None:
        if not factor >= 0:
            raise InputError(f"the divergence guard's factor must be >= 0 (0 = off), got {factor}")
        self.factor = float(factor)
        self.max_halvings = int(max_halvings)
        self.lr_factor = 1.0
        self.rollbacks: list[dict] = []
        self._good: tuple[dict, dict] | None = None

    def remember(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Keep the weights and optimiser state to go back to (copies, on the CPU)."""
        if self.factor > 0:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._good = (weights, _to_cpu(copy.deepcopy(optimizer.state_dict())))

    def diverged(self, train_loss: float, best_train_loss: float, saturated: float = 0.0) -> bool:
        """Whether an epoch must be undone: its ``train_loss``, the best accepted one so far, and the
        :func:`saturated_fraction` of the brain after it."""
        if self.factor <= 0:
            return False
        if not math.isfinite(train_loss) or saturated > SATURATED_BRAIN_FRACTION:
            return True
        return math.isfinite(best_train_loss) and train_loss > self.factor * best_train_loss

    def roll_back(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int, train_loss: float
    ) -> None:
        """Restore the remembered state and halve the learning rate; raise after ``max_halvings``."""
        if self._good is None:
            raise RuntimeError("roll_back() before remember()")
        if len(self.rollbacks) >= self.max_halvings:
            raise FloatingPointError(
                f"training diverged again at epoch {epoch} (loss {train_loss:.4g}) after "
                f"{len(self.rollbacks)} halvings of the learning rate; lower train.learning_rate"
            )
        weights, opt_state = self._good
        model.load_state_dict(weights)
        # A copy: the optimiser adopts the tensors it is given and updates them in place.
        optimizer.load_state_dict(copy.deepcopy(opt_state))
        self.lr_factor /= 2
        self.rollbacks.append(
            {"epoch": int(epoch), "train_loss": float(train_loss), "lr_factor": self.lr_factor}
        )
        log.warning(
            "epoch %d diverged (training loss %.4g): undone, learning rate halved (x%g from now on)",
            epoch,
            train_loss,
            self.lr_factor,
        )

    def state_dict(self) -> dict:
        return {"lr_factor": self.lr_factor, "rollbacks": list(self.rollbacks), "good": self._good}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.lr_factor = float(state.get("lr_factor", 1.0))
        self.rollbacks = list(state.get("rollbacks", []))
        good = state.get("good")
        self._good = (good[0], good[1]) if good is not None else None

    @property
    def remembers(self) -> bool:
        return self._good is not None


def _to_cpu(obj):
    """``obj`` with every tensor inside moved to the CPU (an optimiser state dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
