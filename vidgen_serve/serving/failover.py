"""Latency failover policy: when to move denoise traffic to the standby and back.

The product rule: when generation latency exceeds the baseline by 20% three times in a
row, switch automatically to a standby model instance. This module is the *decision*
only, with no Ray in it, so it can be tested with a fake clock. The router owns the I/O:
it times each denoise call, calls `LatencyFailover.record`, sends traffic to
`LatencyFailover.active`, runs a probe when `probe_due()` says so, and turns every
returned `SwitchEvent` into an alert (log line, metric, trace event).

Latency is judged per unit of work (see `work_units`), so a 15 s 1080p request is not
"slow" next to a 2 s 480p one.

States (`LatencyFailover.state`):

- ``healthy``: the primary serves. Its live calls are judged; ``consecutive_breaches``
  breaches in a row trip it -> ``failed_over``.
- ``failed_over``: the standby serves; the primary is probed every ``probe_interval_s``.
  ``healthy_probes_to_fail_back`` healthy probes in a row -> ``healthy``. If the standby
  trips too -> ``both_degraded``.
- ``both_degraded``: traffic goes to the less-bad target (lowest recent latency relative
  to its own baseline) and the other one is probed. Nothing is dropped. Whichever target
  strings together enough healthy samples first takes over again (the primary wins ties
  because it is checked first).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

Target = Literal["primary", "standby"]
State = Literal["healthy", "failed_over", "both_degraded"]
EventKind = Literal["failover", "failback", "both_degraded"]

PRIMARY: Target = "primary"
STANDBY: Target = "standby"
TARGETS: tuple[Target, Target] = (PRIMARY, STANDBY)


class FailoverSettings(BaseModel):
    """Settings of the latency failover policy (the 3x / 20% rule and its plumbing)."""

    model_config = ConfigDict(extra="forbid")

    threshold_ratio: float = Field(
        1.2,
        gt=1.0,
        description="A call breaches when its latency per work unit is strictly greater than "
        "baseline x threshold_ratio (1.2 = 'more than 20% over the baseline').",
    )
    consecutive_breaches: int = Field(
        3, ge=1, description="Breaches in a row on the serving target that trip a switch."
    )
    baseline_s_per_unit: float | None = Field(
        None,
        gt=0,
        description="Baseline latency in seconds per work unit for both targets. "
        "None: learn it per target from its first `learn_calls` healthy calls.",
    )
    learn_calls: int = Field(
        5,
        ge=1,
        description="Healthy calls whose median becomes a target's baseline when none is configured. "
        "Latency is not judged while learning (errors still count as breaches).",
    )
    baseline_ema_alpha: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Weight of each healthy (non-breach) call in the exponential moving average "
        "that lets the baseline follow slow drift. 0 freezes the baseline.",
    )
    probe_interval_s: float = Field(
        10.0, gt=0, description="Seconds between probes of the target that is not serving."
    )
    healthy_probes_to_fail_back: int = Field(
        3,
        ge=1,
        description="Healthy probes in a row that bring a degraded target back into service.",
    )
    history_size: int = Field(
        50, ge=1, description="Recent normalised latencies kept per target (for snapshots and scoring)."
    )
    switch_history_size: int = Field(
        20, ge=1, description="Recent switch / alert events kept for snapshots."
    )


def work_units(
    num_inference_steps: int,
    latent_tokens: int,
    num_windows: int = 1,
    cfg: bool = True,
) -> float:
    """The amount of denoising work in one call, in transformer token-steps.

    One unit is one latent token going through the transformer once. A call runs
    `num_inference_steps` steps per sliding window, over `latent_tokens` tokens per window,
    and classifier-free guidance doubles the forward passes (conditional + unconditional).
    Attention is super-linear in tokens, so this is a first-order measure: good enough to
    stop a 1080p / 15 s request from looking "slow" next to a 480p / 2 s one.

    Args:
        num_inference_steps: Sampler steps per window.
        latent_tokens: Transformer tokens per window (latent frames x latent height x
            latent width / patch area), as in the `GenerationPlan`.
        num_windows: Sliding windows in the call.
        cfg: Whether classifier-free guidance runs a second (unconditional) pass.

    Returns:
        The work in units (> 0).

    Raises:
        ValueError: If a count is below 1.
    """
    for name, value in (
        ("num_inference_steps", num_inference_steps),
        ("latent_tokens", latent_tokens),
        ("num_windows", num_windows),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    return float(num_inference_steps * latent_tokens * num_windows * (2 if cfg else 1))


@dataclass(frozen=True)
class SwitchEvent:
    """An alert-worthy routing decision. `kind` names the state entered.

    - ``failover``: the standby now serves because the primary (or, from
      ``both_degraded``, the whole situation) says so.
    - ``failback``: the primary serves again, healthy.
    - ``both_degraded``: both targets breached; `to_target` is the less-bad one that
      keeps serving (it may equal `from_target`, see `switched`).

    Attributes:
        time: The policy clock's reading when it happened.
        kind: See above.
        from_target: Target serving before the event.
        to_target: Target serving after it.
        reason: Human-readable explanation for logs and alerts.
        latency_s_per_unit: Normalised latency of the sample that triggered it
            (None when that sample was an error).
        baseline_s_per_unit: Baseline of the sampled target at that moment
            (None while it is still learning).
    """

    time: float
    kind: EventKind
    from_target: Target
    to_target: Target
    reason: str
    latency_s_per_unit: float | None
    baseline_s_per_unit: float | None

    @property
    def switched(self) -> bool:
        """Whether traffic moved to a different target."""
        return self.from_target != self.to_target

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for logs, trace events and snapshots)."""
        return asdict(self)


@dataclass
class _Sample:
    s_per_unit: float | None  # None for an error / timeout
    ratio: float | None  # latency / baseline; inf for an error; None while learning
    breach: bool


class _TargetStats:
    """Everything the policy remembers about one target."""

    def __init__(self, settings: FailoverSettings) -> None:
        self.baseline: float | None = settings.baseline_s_per_unit
        self.baseline_source = "config" if self.baseline is not None else "learning"
        self.learning: list[float] = []
        self.consecutive_breaches = 0
        self.healthy_streak = 0
        self.calls = 0
        self.errors = 0
        self.breaches = 0
        self.trips = 0
        self.recent: deque[_Sample] = deque(maxlen=settings.history_size)

    def snapshot(self) -> dict[str, Any]:
        return {
            "baseline_s_per_unit": self.baseline,
            "baseline_source": self.baseline_source,
            "learning_samples": len(self.learning),
            "consecutive_breaches": self.consecutive_breaches,
            "healthy_streak": self.healthy_streak,
            "calls": self.calls,
            "errors": self.errors,
            "breaches": self.breaches,
            "trips": self.trips,
            "recent_s_per_unit": [s.s_per_unit for s in self.recent],
        }


class LatencyFailover:
    """Thread-safe failover policy between a primary and a standby denoiser.

    Args:
        settings: Policy settings (defaults: the 3x / 20% rule).
        clock: Monotonic clock in seconds; injectable so tests can drive time.
    """

    def __init__(
        self,
        settings: FailoverSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or FailoverSettings()
        self._clock = clock
        # Re-entrant so public methods may call each other under the lock.
        self._lock = threading.RLock()
        self._stats: dict[Target, _TargetStats] = {t: _TargetStats(self.settings) for t in TARGETS}
        self._active: Target = PRIMARY
        self._state: State = "healthy"
        self._last_probe_at: float | None = None
        self._probes = 0
        self._switches: deque[SwitchEvent] = deque(maxlen=self.settings.switch_history_size)

    # ---- read side -------------------------------------------------------------------

    @property
    def active(self) -> Target:
        """The target that should get traffic now. Always a target, never None."""
        with self._lock:
            return self._active

    @property
    def state(self) -> State:
        """``healthy``, ``failed_over`` or ``both_degraded``."""
        with self._lock:
            return self._state

    @property
    def probe_target(self) -> Target | None:
        """The target to probe (the one not serving), or None when healthy."""
        with self._lock:
            return self._probe_target()

    def probe_due(self) -> bool:
        """Whether it is time to probe `probe_target`.

        The first probe is due `probe_interval_s` after the switch (the target just
        failed; probing at once would only waste a call), then every `probe_interval_s`
        after the previous probe was recorded.

        Returns:
            False when healthy (nothing to probe), else whether the interval has passed.
        """
        with self._lock:
            if self._probe_target() is None or self._last_probe_at is None:
                return False
            return self._clock() - self._last_probe_at >= self.settings.probe_interval_s

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable view of the policy, bounded in size.

        Returns:
            ``{"active", "state", "settings", "targets": {"primary": {...}, "standby":
            {...}}, "probe": {...}, "switches": [...]}``; see the module docs and tests.
        """
        with self._lock:
            return {
                "active": self._active,
                "state": self._state,
                "settings": self.settings.model_dump(),
                "targets": {t: self._stats[t].snapshot() for t in TARGETS},
                "probe": {
                    "target": self._probe_target(),
                    "due": self.probe_due(),
                    "interval_s": self.settings.probe_interval_s,
                    "last_probe_at": self._last_probe_at,
                    "probes": self._probes,
                },
                "switches": [e.to_dict() for e in self._switches],
            }

    # ---- write side ------------------------------------------------------------------

    def record(
        self, target: Target, latency_s: float, units: float, ok: bool = True
    ) -> SwitchEvent | None:
        """Record one live denoise call and apply the failover rule.

        Only the serving target's calls are judged for tripping / recovery. Calls that
        finish on the other target (dispatched before a switch) still update its history
        and baseline, but recovery is left to deliberate probes.

        Args:
            target: ``"primary"`` or ``"standby"``: where the call ran.
            latency_s: Wall time of the call in seconds (ignored when `ok` is False).
            units: Work of the call, from `work_units`.
            ok: False for an error or a timeout; it counts as a breach.

        Returns:
            The event when this call changed the routing decision, else None.
        """
        target = _check_target(target)
        with self._lock:
            sample = self._add_sample(target, latency_s, units, ok)
            if target != self._active:
                return None
            return self._judge(target, sample, from_probe=False)

    def record_probe(
        self, latency_s: float, units: float, ok: bool = True, target: Target | None = None
    ) -> SwitchEvent | None:
        """Record a probe of the target that is not serving (the primary when failed over).

        Args:
            latency_s: Wall time of the probe in seconds (ignored when `ok` is False).
            units: Work of the probe, from `work_units`.
            ok: False for an error or a timeout; it resets the healthy-probe count.
            target: The target that was probed, if known. A probe of a target that is no
                longer `probe_target` (the situation changed meanwhile) only updates
                that target's history.

        Returns:
            The event when this probe brought the target back into service, else None.
        """
        with self._lock:
            probed = self._probe_target()
            target = _check_target(target) if target is not None else (probed or PRIMARY)
            sample = self._add_sample(target, latency_s, units, ok)
            if probed is None or target != probed:
                return None
            self._probes += 1
            self._last_probe_at = self._clock()
            return self._judge(target, sample, from_probe=True)

    # ---- internals (call with the lock held) ---------------------------------------

    def _probe_target(self) -> Target | None:
        if self._state == "healthy":
            return None
        return STANDBY if self._active == PRIMARY else PRIMARY

    def _add_sample(self, target: Target, latency_s: float, units: float, ok: bool) -> _Sample:
        """Normalise a call, classify it, and update the target's baseline and history."""
        if ok and not units > 0:
            raise ValueError(f"units must be > 0, got {units!r}")
        if ok and not latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
        stats = self._stats[target]
        stats.calls += 1
        if not ok:
            stats.errors += 1
            sample = _Sample(s_per_unit=None, ratio=float("inf"), breach=True)
        else:
            s_per_unit = latency_s / units
            if stats.baseline is None:
                # Learning: no judgement until we know what "normal" is.
                stats.learning.append(s_per_unit)
                if len(stats.learning) >= self.settings.learn_calls:
                    stats.baseline = statistics.median(stats.learning)
                    stats.baseline_source = "learned"
                sample = _Sample(s_per_unit=s_per_unit, ratio=None, breach=False)
            else:
                ratio = s_per_unit / stats.baseline
                # Strictly greater: exactly 1.2x is "at" the limit, not "exceeding" it.
                breach = ratio > self.settings.threshold_ratio
                if not breach:
                    # Only healthy calls move the baseline, so a slow spell cannot
                    # normalise itself by dragging the baseline up.
                    a = self.settings.baseline_ema_alpha
                    stats.baseline = (1 - a) * stats.baseline + a * s_per_unit
                sample = _Sample(s_per_unit=s_per_unit, ratio=ratio, breach=breach)
        if sample.breach:
            stats.breaches += 1
        stats.recent.append(sample)
        return sample

    def _judge(self, target: Target, sample: _Sample, from_probe: bool) -> SwitchEvent | None:
        """Update the streaks of a judged target and switch when a limit is reached."""
        stats = self._stats[target]
        if sample.breach:
            stats.consecutive_breaches += 1
            stats.healthy_streak = 0
        else:
            stats.consecutive_breaches = 0
            stats.healthy_streak += 1

        if from_probe:
            # A degraded, idle target that has been healthy long enough comes back.
            if stats.healthy_streak >= self.settings.healthy_probes_to_fail_back:
                return self._recover(target, sample, via="probes")
            return None

        # A live call on the serving target.
        if self._state != "healthy" and stats.healthy_streak >= self.settings.healthy_probes_to_fail_back:
            if target == PRIMARY or self._state == "both_degraded":
                # Primary serving healthily again (it was the less-bad one), or the
                # standby recovered while the primary is still degraded.
                return self._recover(target, sample, via="calls")
        if stats.consecutive_breaches >= self.settings.consecutive_breaches:
            return self._trip(target, sample)
        return None

    def _trip(self, target: Target, sample: _Sample) -> SwitchEvent | None:
        stats = self._stats[target]
        n = stats.consecutive_breaches
        stats.trips += 1
        # Start counting afresh: the next trip needs another full run of breaches.
        stats.consecutive_breaches = 0
        why = (
            f"{target}: {n} consecutive calls over {self.settings.threshold_ratio:g}x baseline "
            f"({_describe(sample, stats.baseline)})"
        )
        if self._state == "healthy":
            return self._switch("failed_over", STANDBY, "failover", why, sample, stats.baseline)

        # The serving target is degraded and so is the other one (it tripped earlier and
        # has not recovered): keep serving on whichever is less bad.
        choice = self._less_bad()
        if self._state == "both_degraded" and choice == self._active:
            return None  # still the best of two bad options; already alerted
        scores = ", ".join(f"{t} {self._score(t):.2f}x" for t in TARGETS)
        why += f"; both degraded, serving the less-bad {choice} (recent/baseline: {scores})"
        return self._switch("both_degraded", choice, "both_degraded", why, sample, stats.baseline)

    def _recover(self, target: Target, sample: _Sample, via: str) -> SwitchEvent:
        stats = self._stats[target]
        why = (
            f"{target}: {stats.healthy_streak} healthy {via} in a row "
            f"({_describe(sample, stats.baseline)})"
        )
        if target == PRIMARY:
            return self._switch("healthy", PRIMARY, "failback", why, sample, stats.baseline)
        why += "; primary still degraded"
        return self._switch("failed_over", STANDBY, "failover", why, sample, stats.baseline)

    def _switch(
        self,
        state: State,
        to_target: Target,
        kind: EventKind,
        reason: str,
        sample: _Sample,
        baseline: float | None,
    ) -> SwitchEvent:
        now = self._clock()
        event = SwitchEvent(
            time=now,
            kind=kind,
            from_target=self._active,
            to_target=to_target,
            reason=reason,
            latency_s_per_unit=sample.s_per_unit,
            baseline_s_per_unit=baseline,
        )
        if to_target != self._active:
            # The newly serving target starts with a clean breach count, so stale
            # breaches from before cannot trip it early.
            self._stats[to_target].consecutive_breaches = 0
        probed_before = self._probe_target()
        self._active = to_target
        self._state = state
        probed_now = self._probe_target()
        if probed_now is None:
            self._last_probe_at = None
        elif probed_now != probed_before:
            # A target that just became idle gets its first probe one interval from now.
            self._last_probe_at = now
        self._switches.append(event)
        return event

    def _score(self, target: Target) -> float:
        """How bad a target looks: median latency/baseline over its last few judged samples.

        Errors score infinity; a target with no judged sample yet scores infinity too
        (no evidence that it is fine).
        """
        ratios = [s.ratio for s in self._stats[target].recent if s.ratio is not None]
        window = ratios[-self.settings.consecutive_breaches :]
        return statistics.median(window) if window else float("inf")

    def _less_bad(self) -> Target:
        other = STANDBY if self._active == PRIMARY else PRIMARY
        # Ties stay put: moving costs warm caches and buys nothing.
        return other if self._score(other) < self._score(self._active) else self._active


def _check_target(target: str) -> Target:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target  # type: ignore[return-value]


def _describe(sample: _Sample, baseline: float | None) -> str:
    if sample.s_per_unit is None:
        return "last call failed or timed out"
    if baseline is None:
        return f"last {sample.s_per_unit:.3g} s/unit, baseline still learning"
    return f"last {sample.s_per_unit:.3g} s/unit vs baseline {baseline:.3g} s/unit"
