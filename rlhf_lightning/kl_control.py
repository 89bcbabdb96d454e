"""KL coefficient controllers (fixed, and adaptive as in Ziegler et al. 2019).

State is held as plain floats so it can be stored in a checkpoint that is loaded
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from typing import Union

__all__ = ["AdaptiveKLController", "FixedKLController", "KLController", "make_kl_controller"]


class FixedKLController:
    """Constant ``beta``; ``update`` is a no-op.

    >>> ctl = FixedKLController(0.1); ctl.update(5.0, 100); ctl.beta
    0.1
    """

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target``.

    ``err = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``beta *= 1 + err * n_steps / horizon``.

    >>> ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    >>> ctl.update(12.0, 100)  # err clipped to 0.2 -> beta = 0.1 * 1.002
    >>> round(ctl.beta, 6)
    0.1002
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


KLController = Union[FixedKLController, AdaptiveKLController]


def make_kl_controller(
    beta: float, target_kl: float | None = None, horizon: float = 10000
) -> KLController:
    """Adaptive controller when ``target_kl`` is given, else a fixed one.

    >>> type(make_kl_controller(0.05)).__name__, type(make_kl_controller(0.05, 6.0)).__name__
    ('FixedKLController', 'AdaptiveKLController')
    """
    if target_kl is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target_kl, horizon)
