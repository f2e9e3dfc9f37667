"""Latency failover policy: when to move denoise traffic to the standby and back.

The product rule: when generation latency exceeds the baseline by 20% three times in a
row, switch automatically to a standby model instance. This module is the *decision*
only, with no Ray in it, so it can be tested with a fake clock. The router owns the I/O:
it times each denoise call, calls `LatencyFailover.record`, sends traffic to
`LatencyFailover.active`, sends the probe `next_probe()` names when it is due, and turns
every returned `SwitchEvent` into an alert (log line, metric, trace event).

Live calls are judged per unit of work (`GenerationPlan.work_units`), so a 15 s 1080p
request is not "slow" next to a 2 s 480p one. Probes are judged against a separate *probe
baseline*: what the probe itself costs on a healthy target. A small probe carries more
fixed cost per unit than large traffic does, so judging it against the live baseline
would call a healthy target slow for as long as the traffic's shape differs from the
probe's, and traffic would never come back.

The probe baseline is learned from *calibration probes*, sent to targets that are not
degraded (both at start-up; the serving one while failed over) until `probe_learn_calls`
of them succeeded, then follows drift with the same moving average as the live baseline.
A recovery probe of a target with no probe baseline yet is judged against the other
target's (same model, same probe), else against the target's live baseline.

States (`LatencyFailover.state`):

- ``healthy``: the primary serves. Its live calls are judged; ``consecutive_breaches``
  breaches in a row trip it -> ``failed_over``.
- ``failed_over``: the standby serves; the primary is probed every ``probe_interval_s``
  (measured from the start of the previous probe). ``healthy_probes_to_fail_back``
  healthy probes in a row -> ``healthy``. If the standby trips too -> ``both_degraded``.
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
ProbeKind = Literal["recovery", "calibration"]

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
        10.0,
        gt=0,
        description="Seconds between the starts of two probes of the target that is not serving.",
    )
    probe_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A probe still running after this many seconds is cancelled and counts as a failed "
        "probe. None: probe_interval_s, so a hung target never delays the next probe.",
    )
    probe_learn_calls: int = Field(
        3,
        ge=1,
        description="Successful calibration probes whose median becomes a target's probe baseline (what the "
        "probe costs on a healthy target; recovery probes are judged against it, not against live traffic).",
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

    @property
    def effective_probe_timeout_s(self) -> float:
        """`probe_timeout_s`, or `probe_interval_s` when unset."""
        return self.probe_timeout_s if self.probe_timeout_s is not None else self.probe_interval_s


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
    ratio: float | None  # latency / baseline; inf for an error; None while not judged
    breach: bool
    baseline: float | None = None  # what it was judged against
    baseline_kind: str = "baseline"


class _Baseline:
    """A latency-per-unit baseline: configured, or the median of the first healthy samples,
    then an exponential moving average of healthy samples."""

    def __init__(self, configured: float | None, learn_calls: int, ema_alpha: float) -> None:
        self.value = configured
        self.source = "config" if configured is not None else "learning"
        self.learning: list[float] = []
        self._learn_calls = learn_calls
        self._alpha = ema_alpha

    def learn(self, s_per_unit: float) -> None:
        self.learning.append(s_per_unit)
        if len(self.learning) >= self._learn_calls:
            self.value = statistics.median(self.learning)
            self.source = "learned"

    def follow(self, s_per_unit: float) -> None:
        """Move towards a healthy sample. Only healthy samples move it, so a slow spell
        cannot normalise itself by dragging the baseline up."""
        if self.value is not None:
            self.value = (1 - self._alpha) * self.value + self._alpha * s_per_unit


class _TargetStats:
    """Everything the policy remembers about one target."""

    def __init__(self, settings: FailoverSettings) -> None:
        self.live = _Baseline(settings.baseline_s_per_unit, settings.learn_calls, settings.baseline_ema_alpha)
        self.probe = _Baseline(None, settings.probe_learn_calls, settings.baseline_ema_alpha)
        self.consecutive_breaches = 0
        self.healthy_streak = 0
        self.calls = 0
        self.errors = 0
        self.breaches = 0
        self.trips = 0
        self.probes = 0
        self.probe_errors = 0
        self.recent: deque[_Sample] = deque(maxlen=settings.history_size)

    @property
    def baseline(self) -> float | None:
        return self.live.value

    def snapshot(self) -> dict[str, Any]:
        return {
            "baseline_s_per_unit": self.live.value,
            "baseline_source": self.live.source,
            "learning_samples": len(self.live.learning),
            "probe_baseline_s_per_unit": self.probe.value,
            "probe_baseline_source": self.probe.source,
            "probe_learning_samples": len(self.probe.learning),
            "consecutive_breaches": self.consecutive_breaches,
            "healthy_streak": self.healthy_streak,
            "calls": self.calls,
            "errors": self.errors,
            "breaches": self.breaches,
            "trips": self.trips,
            "probes": self.probes,
            "probe_errors": self.probe_errors,
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
        # A failed calibration probe delays the next one of that target by an interval.
        self._calibrate_after: dict[Target, float] = {}
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
        """The target to probe for recovery (the one not serving), or None when healthy."""
        with self._lock:
            return self._probe_target()

    def probe_due(self) -> bool:
        """Whether it is time for a recovery probe of `probe_target`.

        The first probe is due `probe_interval_s` after the switch (the target just
        failed; probing at once would only waste a call), then `probe_interval_s` after
        the previous probe started.

        Returns:
            False when healthy (nothing to probe), else whether the interval has passed.
        """
        with self._lock:
            return self._recovery_wait() == 0.0

    def calibration_target(self) -> Target | None:
        """A target to send a calibration probe to now, or None.

        Targets still learning their probe baseline are calibrated while they are not
        degraded (the probe target is never calibrated: its slowness would become the
        norm), one probe at a time, at once unless the previous calibration probe of that
        target failed (then one `probe_interval_s` later).
        """
        with self._lock:
            now = self._clock()
            waiting = self._calibration_waits(now)
            ready = [t for t, wait in waiting.items() if wait == 0.0]
            # The target with fewer samples first, so both get a baseline early.
            return min(ready, key=lambda t: len(self._stats[t].probe.learning), default=None)

    def next_probe(self) -> tuple[Target, ProbeKind] | None:
        """The probe to send now, if any: a due recovery probe first, else a calibration probe."""
        with self._lock:
            if self.probe_due():
                return self._probe_target(), "recovery"  # type: ignore[return-value]
            target = self.calibration_target()
            return (target, "calibration") if target is not None else None

    def seconds_until_next_probe(self) -> float | None:
        """Seconds until `next_probe` will name a probe (0: now), or None if nothing is pending.

        A router can sleep this long (capped, since a switch can make a probe due sooner).
        """
        with self._lock:
            waits = list(self._calibration_waits(self._clock()).values())
            recovery = self._recovery_wait()
            if recovery is not None:
                waits.append(recovery)
            return min(waits, default=None)

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
                    "timeout_s": self.settings.effective_probe_timeout_s,
                    "last_probe_at": self._last_probe_at,
                    "probes": self._probes,
                    "calibrating": sorted(self._calibration_waits(self._clock())),
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
            units: Work of the call (`GenerationPlan.work_units`).
            ok: False for an error or a timeout; it counts as a breach.

        Returns:
            The event when this call changed the routing decision, else None.
        """
        target = _check_target(target)
        with self._lock:
            s_per_unit = _normalise(latency_s, units, ok)
            stats = self._stats[target]
            stats.calls += 1
            if s_per_unit is None:
                sample = _Sample(None, float("inf"), True)
            elif stats.live.value is None:
                # Learning: no judgement until we know what "normal" is.
                stats.live.learn(s_per_unit)
                sample = _Sample(s_per_unit, None, False)
            else:
                sample = self._judged(s_per_unit, stats.live.value, "baseline")
                if not sample.breach:
                    stats.live.follow(s_per_unit)
            self._count(stats, sample)
            if target != self._active:
                return None
            return self._judge(target, sample, from_probe=False)

    def record_probe(
        self,
        latency_s: float,
        units: float,
        ok: bool = True,
        target: Target | None = None,
        started_at: float | None = None,
    ) -> SwitchEvent | None:
        """Record a probe: a recovery probe of `probe_target`, or a calibration probe.

        A probe of the current `probe_target` is a recovery probe, judged against the
        target's probe baseline (see the module docs); enough healthy ones in a row bring
        the target back. A probe of any other target is a calibration probe: it only
        teaches (or follows) that target's probe baseline.

        Args:
            latency_s: Wall time of the probe in seconds (ignored when `ok` is False).
            units: Work of the probe (`GenerationPlan.work_units` of the probe request).
            ok: False for an error or a timeout; it resets the healthy-probe count.
            target: The target that was probed (default: `probe_target`, else the primary).
            started_at: The policy clock's reading when the probe was sent; the next
                recovery probe is due `probe_interval_s` after it (default: now).

        Returns:
            The event when this probe brought the target back into service, else None.
        """
        with self._lock:
            probed = self._probe_target()
            target = _check_target(target) if target is not None else (probed or PRIMARY)
            s_per_unit = _normalise(latency_s, units, ok)
            stats = self._stats[target]
            stats.probes += 1
            stats.probe_errors += s_per_unit is None
            now = self._clock()
            if target != probed:
                self._calibrate(target, s_per_unit, now)
                return None
            self._probes += 1
            self._last_probe_at = started_at if started_at is not None else now
            sample = self._judge_probe(target, s_per_unit)
            self._count(stats, sample)
            return self._judge(target, sample, from_probe=True)

    # ---- internals (call with the lock held) ---------------------------------------

    def _probe_target(self) -> Target | None:
        if self._state == "healthy":
            return None
        return STANDBY if self._active == PRIMARY else PRIMARY

    def _recovery_wait(self) -> float | None:
        """Seconds until the next recovery probe is due (0: due), None when healthy."""
        if self._probe_target() is None or self._last_probe_at is None:
            return None
        return max(0.0, self._last_probe_at + self.settings.probe_interval_s - self._clock())

    def _calibration_waits(self, now: float) -> dict[Target, float]:
        """{target still to calibrate: seconds until its next calibration probe}."""
        degraded = self._probe_target()
        return {
            t: max(0.0, self._calibrate_after.get(t, now) - now)
            for t in TARGETS
            if t != degraded and self._stats[t].probe.value is None
        }

    def _calibrate(self, target: Target, s_per_unit: float | None, now: float) -> None:
        baseline = self._stats[target].probe
        if s_per_unit is None:
            self._calibrate_after[target] = now + self.settings.probe_interval_s
            return
        self._calibrate_after.pop(target, None)
        if baseline.value is None:
            baseline.learn(s_per_unit)
        elif s_per_unit <= baseline.value * self.settings.threshold_ratio:
            baseline.follow(s_per_unit)

    def _judge_probe(self, target: Target, s_per_unit: float | None) -> _Sample:
        """A recovery probe against the best baseline there is for it (see the module docs)."""
        if s_per_unit is None:
            return _Sample(None, float("inf"), True)
        other = STANDBY if target == PRIMARY else PRIMARY
        own = self._stats[target].probe
        for baseline, kind in ((own.value, "probe baseline"),
                               (self._stats[other].probe.value, f"{other}'s probe baseline"),
                               (self._stats[target].live.value, "live baseline")):
            if baseline is not None:
                sample = self._judged(s_per_unit, baseline, kind)
                if not sample.breach and kind == "probe baseline":
                    own.follow(s_per_unit)
                return sample
        # Nothing to compare with: a probe that answered is the only evidence there is.
        return _Sample(s_per_unit, None, False, None, "no baseline yet")

    def _judged(self, s_per_unit: float, baseline: float, kind: str) -> _Sample:
        ratio = s_per_unit / baseline
        # Strictly greater: exactly 1.2x is "at" the limit, not "exceeding" it.
        return _Sample(s_per_unit, ratio, ratio > self.settings.threshold_ratio, baseline, kind)

    @staticmethod
    def _count(stats: _TargetStats, sample: _Sample) -> None:
        if sample.s_per_unit is None:
            stats.errors += 1
        if sample.breach:
            stats.breaches += 1
        stats.recent.append(sample)

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
        why = f"{target}: {n} consecutive calls over {self.settings.threshold_ratio:g}x baseline ({_describe(sample)})"
        if self._state == "healthy":
            return self._switch("failed_over", STANDBY, "failover", why, sample)

        # The serving target is degraded and so is the other one (it tripped earlier and
        # has not recovered): keep serving on whichever is less bad.
        choice = self._less_bad()
        if self._state == "both_degraded" and choice == self._active:
            return None  # still the best of two bad options; already alerted
        scores = ", ".join(f"{t} {self._score(t):.2f}x" for t in TARGETS)
        why += f"; both degraded, serving the less-bad {choice} (recent/baseline: {scores})"
        return self._switch("both_degraded", choice, "both_degraded", why, sample)

    def _recover(self, target: Target, sample: _Sample, via: str) -> SwitchEvent:
        stats = self._stats[target]
        why = f"{target}: {stats.healthy_streak} healthy {via} in a row ({_describe(sample)})"
        if target == PRIMARY:
            return self._switch("healthy", PRIMARY, "failback", why, sample)
        why += "; primary still degraded"
        return self._switch("failed_over", STANDBY, "failover", why, sample)

    def _switch(self, state: State, to_target: Target, kind: EventKind, reason: str, sample: _Sample) -> SwitchEvent:
        now = self._clock()
        event = SwitchEvent(
            time=now,
            kind=kind,
            from_target=self._active,
            to_target=to_target,
            reason=reason,
            latency_s_per_unit=sample.s_per_unit,
            baseline_s_per_unit=sample.baseline,
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


def _normalise(latency_s: float, units: float, ok: bool) -> float | None:
    """Seconds per work unit, or None for a failed call; rejects nonsense before any state changes."""
    if not ok:
        return None
    if not units > 0:
        raise ValueError(f"units must be > 0, got {units!r}")
    if not latency_s >= 0:
        raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
    return latency_s / units


def _check_target(target: str) -> Target:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target  # type: ignore[return-value]


def _describe(sample: _Sample) -> str:
    if sample.s_per_unit is None:
        return "last call failed or timed out"
    if sample.baseline is None:
        return f"last {sample.s_per_unit:.3g} s/unit, baseline still learning"
    return f"last {sample.s_per_unit:.3g} s/unit vs {sample.baseline_kind} {sample.baseline:.3g} s/unit"
