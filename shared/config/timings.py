"""The leader election's timings, derived and validated up front (client-go's LeaseDuration >
RenewDeadline > RetryPeriod).

``LeaderElectionConfig.build`` derives what is not set and raises ``ElectionConfigError`` (a
``shared.errors.ConfigError``) naming the setting to change. Pure: imports ``shared.errors`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import ConfigError


class ElectionConfigError(ConfigError):
    """The election timings are inconsistent; the message says which setting to change."""


@dataclass(frozen=True)
class LeaderElectionConfig:
    """Timings of the election. Build it with ``build`` so that they are derived and validated.

    ``lease_seconds > renew_deadline_seconds > renew_interval_seconds`` must hold, as
    client-go's LeaseDuration > RenewDeadline > RetryPeriod: the leader renews every
    ``renew_interval_seconds`` and stops leading if it has not renewed for
    ``renew_deadline_seconds`` (= lease - safety margin).
    """

    lease_seconds: float = 60
    renew_interval_seconds: float = 20
    safety_margin_seconds: float = 10

    @property
    def renew_deadline_seconds(self) -> float:
        """How long after the last successful renew was sent the leader may still start work."""
        return self.lease_seconds - self.safety_margin_seconds

    @staticmethod
    def derived_renew_interval(lease_seconds: float) -> float:
        """The renew interval used when none is set: a third of the lease, in whole seconds."""
        return float(max(1, math.floor(lease_seconds / 3)))

    @staticmethod
    def derived_safety_margin(lease_seconds: float) -> float:
        """The safety margin used when none is set: a sixth of the lease, rounded up."""
        return float(max(1, math.ceil(lease_seconds / 6)))

    @classmethod
    def build(
        cls,
        lease_seconds: float = 60,
        renew_interval_seconds: float | None = None,
        safety_margin_seconds: float | None = None,
        step_seconds: float = 0,
        setting_names: Sequence[str] = ("lease_seconds", "renew_interval_seconds",
                                        "safety_margin_seconds", "step_seconds"),
    ) -> LeaderElectionConfig:
        """Derive what is not set, validate, and return the config.

        ``None`` derives the renew interval (lease / 3) and the margin (lease / 6, rounded up)
        from the lease: 60 s gives 20 and 10, 15 s gives 5 and 3. ``step_seconds`` is the longest
        one storage step may take (the storage timeout): the leader must be able to start one
        right up to its next renewal, so ``renew interval + step <= lease - margin``. Raises
        ``ElectionConfigError`` naming the setting to change and the value that would fit.
        """
        lease_name, renew_name, margin_name, step_name = setting_names
        if not 15 <= lease_seconds <= 60:
            raise ElectionConfigError(
                f"{lease_name}={lease_seconds:g}: Azure blob leases last 15 to 60 seconds; "
                f"set {lease_name} between 15 and 60 (default 60)."
            )
        margin = (cls.derived_safety_margin(lease_seconds) if safety_margin_seconds is None
                  else safety_margin_seconds)
        renew = (cls.derived_renew_interval(lease_seconds) if renew_interval_seconds is None
                 else renew_interval_seconds)
        if margin <= 0:
            raise ElectionConfigError(f"{margin_name} must be greater than 0.")
        if renew <= 0:
            raise ElectionConfigError(f"{renew_name} must be greater than 0.")
        config = cls(lease_seconds, renew, margin)
        deadline = config.renew_deadline_seconds
        renew_text = f"{renew:g} s{' derived' if renew_interval_seconds is None else ''}"
        margin_text = f"{margin:g}{' derived' if safety_margin_seconds is None else ''}"
        if not deadline > renew:
            raise ElectionConfigError(
                f"{lease_name} - {margin_name} ({lease_seconds:g} - {margin_text} = {deadline:g} "
                f"s) must be greater than {renew_name} ({renew_text}), or the leader cannot renew "
                f"before it must stop; lower {renew_name} or {margin_name}, or leave them unset "
                f"to derive them from {lease_name} ({cls._derived_text(lease_seconds)})."
            )
        if renew + step_seconds > deadline:
            fits = deadline - renew
            raise ElectionConfigError(
                f"{step_name}={step_seconds:g} does not fit: {renew_name} ({renew_text}) + "
                f"{step_name} must be at most {lease_name} - {margin_name} ({lease_seconds:g} - "
                f"{margin_text} = {deadline:g} s), "
                f"or the leader gives up its lease between two renewals; set {step_name} to at "
                f"most {fits:g}, lower {renew_name}, or raise {lease_name}."
            )
        return config

    @classmethod
    def _derived_text(cls, lease_seconds: float) -> str:
        return (f"{lease_seconds:g} s gives {cls.derived_renew_interval(lease_seconds):g} and "
                f"{cls.derived_safety_margin(lease_seconds):g}")
