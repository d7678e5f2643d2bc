"""Loss weights that change with the epoch (beta, gamma): constant, ramp or cyclical.

With ``frac`` in [0, 1] the weight is ``weight * (start + (1 - start) * frac)`` at epoch
``e`` (0-based):

- constant: frac = 1 at every epoch;
- ramp: frac = min(1, e / ramp_epochs): linear from ``start`` to full over ramp_epochs, then full;
- cyclical: cycles of ramp_epochs epochs; within a cycle the first half ramps linearly from
  ``start`` and the second half holds full weight (cyclical annealing, Fu et al. 2019).
"""

from __future__ import annotations

from cryovae.config import Schedule


def schedule_fraction(schedule: Schedule, epoch: int) -> float:
    """The schedule's fraction of the full weight at ``epoch`` (0-based), in [0, 1]."""
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "ramp":
        return min(1.0, epoch / schedule.ramp_epochs)
    if schedule.kind == "cyclical":
        position = (epoch % schedule.ramp_epochs) / schedule.ramp_epochs
        return min(1.0, 2.0 * position)
    raise ValueError(f"unknown schedule kind {schedule.kind!r}")


def schedule_value(weight: float, schedule: Schedule, epoch: int) -> float:
    """The weight at ``epoch``: weight * (start + (1 - start) * fraction); constant ignores start."""
    if schedule.kind == "constant":
        return float(weight)
    frac = schedule_fraction(schedule, epoch)
    return float(weight * (schedule.start + (1.0 - schedule.start) * frac))
