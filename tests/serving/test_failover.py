"""Tests of the latency failover policy (pure Python, driven by a fake clock)."""

from __future__ import annotations

import json
import threading

import pytest
from pydantic import ValidationError

from vidgen_serve.config import AppConfig
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest
from vidgen_serve.serving.failover import (
    FailoverSettings,
    LatencyFailover,
    SwitchEvent,
)

BASE = 0.01  # seconds per work unit
UNITS = 100.0  # a call of this size takes 1.0 s at the baseline
NORMAL = BASE * UNITS  # 1.0 s
SLOW = NORMAL * 1.5  # 50% over the baseline: a breach


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_policy(clock: FakeClock | None = None, **overrides) -> LatencyFailover:
    settings = {"baseline_s_per_unit": BASE, "baseline_ema_alpha": 0.0, **overrides}
    return LatencyFailover(FailoverSettings(**settings), clock=clock or FakeClock())


def fail_over(policy: LatencyFailover) -> SwitchEvent:
    events = [policy.record("primary", SLOW, UNITS) for _ in range(3)]
    assert events[:2] == [None, None]
    assert events[2] is not None
    return events[2]


# ---- the 3x / 20% rule ---------------------------------------------------------------


def test_two_slow_one_normal_two_slow_does_not_trip():
    policy = make_policy()
    for latency in (SLOW, SLOW, NORMAL, SLOW, SLOW):
        assert policy.record("primary", latency, UNITS) is None
    assert policy.active == "primary"
    assert policy.state == "healthy"
    assert policy.snapshot()["targets"]["primary"]["consecutive_breaches"] == 2


def test_three_slow_in_a_row_trip_to_standby_and_say_why():
    clock = FakeClock()
    policy = make_policy(clock)
    event = fail_over(policy)
    assert policy.active == "standby"
    assert policy.state == "failed_over"
    assert event.kind == "failover"
    assert (event.from_target, event.to_target) == ("primary", "standby")
    assert event.switched
    assert event.time == clock.now
    assert event.latency_s_per_unit == pytest.approx(SLOW / UNITS)
    assert event.baseline_s_per_unit == pytest.approx(BASE)
    assert "3 consecutive" in event.reason and "1.2x baseline" in event.reason


def test_consecutive_breaches_setting_is_exact():
    policy = make_policy(consecutive_breaches=5)
    for _ in range(4):
        assert policy.record("primary", SLOW, UNITS) is None
    assert policy.record("primary", SLOW, UNITS) is not None


def test_standby_calls_do_not_trip_while_primary_serves():
    policy = make_policy()
    for _ in range(5):
        assert policy.record("standby", SLOW, UNITS) is None
    assert policy.active == "primary"


def test_threshold_is_strictly_greater_than_ratio():
    # Exactly 1.2x is "at" the limit, not "exceeding the baseline by 20%".
    at_limit = make_policy()
    for _ in range(5):
        assert at_limit.record("primary", BASE * 1.2 * UNITS, UNITS) is None
    assert at_limit.snapshot()["targets"]["primary"]["breaches"] == 0

    above = make_policy()
    events = [above.record("primary", BASE * 1.2001 * UNITS, UNITS) for _ in range(3)]
    assert events[2] is not None and above.active == "standby"


def test_errors_count_as_breaches():
    policy = make_policy()
    assert policy.record("primary", 0.0, UNITS, ok=False) is None
    assert policy.record("primary", 30.0, UNITS, ok=False) is None  # a timeout
    event = policy.record("primary", 0.0, UNITS, ok=False)
    assert event is not None and event.kind == "failover"
    assert event.latency_s_per_unit is None
    assert "failed or timed out" in event.reason
    assert policy.snapshot()["targets"]["primary"]["errors"] == 3


def test_errors_mix_with_slow_calls():
    policy = make_policy()
    policy.record("primary", SLOW, UNITS)
    policy.record("primary", 0.0, UNITS, ok=False)
    assert policy.record("primary", SLOW, UNITS) is not None


# ---- work normalisation --------------------------------------------------------------


def plan_units(**fields) -> float:
    return build_plan(VideoRequest(prompt="a cat", seed=1, **fields), AppConfig()).work_units


def test_work_units_come_from_the_plan_and_count_cfg_passes():
    base = {"duration": 2, "resolution": "480p", "num_inference_steps": 4}
    cfg = build_plan(VideoRequest(prompt="a cat", seed=1, guidance_scale=5.0, **base), AppConfig())
    assert cfg.classifier_free_guidance
    assert cfg.work_units == 4 * cfg.window_tokens * 2
    # guidance_scale 1: no unconditional pass, half the transformer work
    assert plan_units(guidance_scale=1.0, **base) == cfg.work_units / 2
    assert plan_units(**{**base, "num_inference_steps": 8}) == 2 * cfg.work_units
    long = build_plan(VideoRequest(prompt="a cat", seed=1, **{**base, "duration": 12}), AppConfig())
    assert len(long.windows) > 1 and long.work_units == 4 * long.window_tokens * 2


def test_guidance_free_calls_do_not_skew_the_baseline():
    """A mix of CFG and guidance-free calls at the same speed per transformer pass is all healthy:
    with units from the plan, guidance-free calls do not look twice as fast (pulling the learned
    baseline down until normal calls breach)."""
    seconds_per_pass = BASE
    policy = LatencyFailover(FailoverSettings(learn_calls=4, baseline_ema_alpha=0.0), clock=FakeClock())
    calls = [{"guidance_scale": 1.0}] * 3 + [{"guidance_scale": 5.0}] * 6
    for fields in calls:
        units = plan_units(duration=2, resolution="480p", num_inference_steps=4, **fields)
        assert policy.record("primary", seconds_per_pass * units, units) is None
    assert policy.snapshot()["targets"]["primary"]["breaches"] == 0
    assert policy.active == "primary"


def test_big_call_at_the_same_speed_per_unit_is_not_a_breach():
    policy = make_policy()
    small = 200.0
    big = small * 10
    for _ in range(5):
        assert policy.record("primary", BASE * big, big) is None  # 10x work, 10x latency
    assert policy.snapshot()["targets"]["primary"]["breaches"] == 0
    assert policy.active == "primary"


def test_small_call_slower_per_unit_is_a_breach():
    policy = make_policy()
    small = 200.0
    for _ in range(2):
        policy.record("primary", BASE * 1.3 * small, small)
    assert policy.snapshot()["targets"]["primary"]["consecutive_breaches"] == 2
    assert policy.record("primary", BASE * 1.3 * small, small) is not None


def test_bad_inputs_are_rejected():
    policy = make_policy()
    with pytest.raises(ValueError, match="target"):
        policy.record("tertiary", 1.0, UNITS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="units"):
        policy.record("primary", 1.0, 0)
    assert policy.snapshot()["targets"]["primary"]["calls"] == 0


# ---- baseline ------------------------------------------------------------------------


def learning_policy(**overrides) -> LatencyFailover:
    settings = {"learn_calls": 5, "baseline_ema_alpha": 0.0, **overrides}
    return LatencyFailover(FailoverSettings(**settings), clock=FakeClock())


def test_baseline_is_the_median_of_the_first_k_healthy_calls():
    policy = learning_policy()
    # Wildly varying calls while learning: none of them is judged.
    for s_per_unit in (0.010, 0.030, 0.011, 0.050, 0.012):
        assert policy.record("primary", s_per_unit * UNITS, UNITS) is None
    primary = policy.snapshot()["targets"]["primary"]
    assert primary["baseline_s_per_unit"] == pytest.approx(0.012)
    assert primary["baseline_source"] == "learned"
    assert primary["breaches"] == 0
    # Each target learns its own baseline.
    assert policy.snapshot()["targets"]["standby"]["baseline_source"] == "learning"


def test_not_judged_while_learning_but_errors_still_count():
    policy = learning_policy()
    policy.record("primary", 1.0, UNITS)
    policy.record("primary", 50.0, UNITS)  # would be a breach against any sane baseline
    assert policy.snapshot()["targets"]["primary"]["consecutive_breaches"] == 0
    for _ in range(2):
        assert policy.record("primary", 0.0, UNITS, ok=False) is None
    event = policy.record("primary", 0.0, UNITS, ok=False)
    assert event is not None and event.baseline_s_per_unit is None
    assert "still learning" not in event.reason  # the last sample was an error
    # Errors are not learning samples.
    assert policy.snapshot()["targets"]["primary"]["learning_samples"] == 2


def test_learned_baseline_then_judges():
    policy = learning_policy()
    for _ in range(5):
        policy.record("primary", NORMAL, UNITS)
    for _ in range(2):
        assert policy.record("primary", SLOW, UNITS) is None
    assert policy.record("primary", SLOW, UNITS) is not None


def test_ema_moves_baseline_with_healthy_calls_only():
    policy = make_policy(baseline_ema_alpha=0.5)
    policy.record("primary", BASE * 1.1 * UNITS, UNITS)  # healthy, a bit slower
    assert policy.snapshot()["targets"]["primary"]["baseline_s_per_unit"] == pytest.approx(BASE * 1.05)
    before = policy.snapshot()["targets"]["primary"]["baseline_s_per_unit"]
    policy.record("primary", BASE * 3 * UNITS, UNITS)  # a breach must not drag it up
    policy.record("primary", 0.0, UNITS, ok=False)  # nor an error
    assert policy.snapshot()["targets"]["primary"]["baseline_s_per_unit"] == pytest.approx(before)


# ---- probing and fail-back -----------------------------------------------------------


def test_probe_due_follows_the_clock():
    clock = FakeClock()
    policy = make_policy(clock, probe_interval_s=10)
    assert not policy.probe_due()  # healthy: nothing to probe
    assert policy.probe_target is None
    fail_over(policy)
    assert policy.probe_target == "primary"
    assert not policy.probe_due()  # first probe one interval after the switch
    clock.advance(9.9)
    assert not policy.probe_due()
    clock.advance(0.1)
    assert policy.probe_due()
    policy.record_probe(NORMAL, UNITS)
    assert not policy.probe_due()
    clock.advance(10)
    assert policy.probe_due()


def test_fail_back_after_m_healthy_probes_in_a_row():
    clock = FakeClock()
    policy = make_policy(clock, healthy_probes_to_fail_back=3)
    fail_over(policy)
    assert policy.record_probe(NORMAL, UNITS) is None
    assert policy.record_probe(NORMAL, UNITS) is None
    assert policy.active == "standby"
    event = policy.record_probe(NORMAL, UNITS)
    assert event is not None
    assert event.kind == "failback"
    assert (event.from_target, event.to_target) == ("standby", "primary")
    assert policy.active == "primary" and policy.state == "healthy"
    assert not policy.probe_due()
    assert [e["kind"] for e in policy.snapshot()["switches"]] == ["failover", "failback"]


def test_unhealthy_probe_resets_the_healthy_count():
    policy = make_policy(healthy_probes_to_fail_back=3)
    fail_over(policy)
    policy.record_probe(NORMAL, UNITS)
    policy.record_probe(NORMAL, UNITS)
    assert policy.record_probe(SLOW, UNITS) is None  # back to zero
    policy.record_probe(NORMAL, UNITS)
    assert policy.record_probe(0.0, UNITS, ok=False) is None  # an error resets too
    assert policy.record_probe(NORMAL, UNITS) is None
    assert policy.record_probe(NORMAL, UNITS) is None
    assert policy.active == "standby"
    assert policy.record_probe(NORMAL, UNITS) is not None
    assert policy.active == "primary"


def test_late_primary_calls_after_failover_do_not_fail_back():
    # Calls dispatched before the switch may finish afterwards; recovery needs probes.
    policy = make_policy(healthy_probes_to_fail_back=1)
    fail_over(policy)
    assert policy.record("primary", NORMAL, UNITS) is None
    assert policy.active == "standby"


def test_stale_probe_of_the_wrong_target_is_ignored():
    policy = make_policy(healthy_probes_to_fail_back=1)
    fail_over(policy)
    assert policy.record_probe(NORMAL, UNITS, target="standby") is None
    assert policy.active == "standby"


def test_can_fail_over_again_after_fail_back():
    policy = make_policy(healthy_probes_to_fail_back=1)
    fail_over(policy)
    policy.record_probe(NORMAL, UNITS)
    assert policy.active == "primary"
    fail_over(policy)
    assert policy.active == "standby"
    assert policy.snapshot()["targets"]["primary"]["trips"] == 2


# ---- probe baseline: fail-back independent of the traffic's shape --------------------

PROBE_UNITS = 10.0  # a small canary
PROBE_S = 0.4  # what the canary takes on a healthy target: 0.04 s/unit, 4x the live calls' 0.01


def calibrate(policy: LatencyFailover, seconds: float = PROBE_S) -> None:
    """Send the calibration probes the policy asks for, each answering in `seconds`."""
    for _ in range(20):
        probe = policy.next_probe()
        if probe is None or probe[1] != "calibration":
            return
        assert policy.record_probe(seconds, PROBE_UNITS, target=probe[0]) is None
    raise AssertionError("calibration never finished")


def test_start_up_calibrates_both_targets_then_stops():
    clock = FakeClock()
    policy = make_policy(clock, probe_learn_calls=3)
    asked = []
    for _ in range(6):
        target, kind = policy.next_probe()
        assert kind == "calibration"
        asked.append(target)
        policy.record_probe(PROBE_S, PROBE_UNITS, target=target)
    assert sorted(asked) == ["primary"] * 3 + ["standby"] * 3
    assert policy.next_probe() is None and policy.seconds_until_next_probe() is None
    for target in ("primary", "standby"):
        snap = policy.snapshot()["targets"][target]
        assert snap["probe_baseline_s_per_unit"] == pytest.approx(PROBE_S / PROBE_UNITS)
        assert snap["probe_baseline_source"] == "learned"
        # Calibration is not live traffic: neither the live baseline nor the streaks move.
        assert snap["baseline_s_per_unit"] == BASE and snap["calls"] == 0
    assert policy.active == "primary" and policy.state == "healthy"


def test_failed_calibration_probe_waits_an_interval():
    clock = FakeClock()
    policy = make_policy(clock, probe_interval_s=10)
    policy.record_probe(0.0, PROBE_UNITS, ok=False, target="primary")
    assert policy.calibration_target() == "standby"  # the other one is still asked at once
    policy.record_probe(PROBE_S, PROBE_UNITS, target="standby")
    policy.record_probe(PROBE_S, PROBE_UNITS, target="standby")
    policy.record_probe(PROBE_S, PROBE_UNITS, target="standby")
    assert policy.calibration_target() is None
    assert policy.seconds_until_next_probe() == pytest.approx(10)
    clock.advance(10)
    assert policy.next_probe() == ("primary", "calibration")


def test_a_degraded_target_is_not_calibrated():
    policy = make_policy()
    fail_over(policy)  # before any calibration
    assert policy.calibration_target() == "standby"  # the serving one, not the slow primary
    calibrate(policy)
    snap = policy.snapshot()["targets"]
    assert snap["primary"]["probe_baseline_source"] == "learning"
    assert snap["standby"]["probe_baseline_source"] == "learned"


def test_fail_back_when_live_traffic_is_bigger_than_the_probe():
    """The drill that failed: a canary carries 4x the fixed cost per unit of the live
    traffic. Judged against the live baseline every probe breached and traffic stayed on
    the standby for good; judged against the probe baseline the primary comes back."""
    clock = FakeClock()
    policy = make_policy(clock, probe_interval_s=10, healthy_probes_to_fail_back=3)
    calibrate(policy)
    for _ in range(5):
        assert policy.record("primary", NORMAL, UNITS) is None  # live: 0.01 s/unit
    fail_over(policy)
    assert policy.probe_target == "primary"
    events = []
    for _ in range(3):
        clock.advance(10)
        assert policy.next_probe() == ("primary", "recovery")
        events.append(policy.record_probe(PROBE_S, PROBE_UNITS))  # the primary is fine again
    assert events[:2] == [None, None]
    assert events[2] is not None and events[2].kind == "failback"
    assert "probe baseline" in events[2].reason
    assert events[2].baseline_s_per_unit == pytest.approx(PROBE_S / PROBE_UNITS)
    assert policy.active == "primary" and policy.state == "healthy"


def test_slow_recovery_probe_is_judged_against_the_probe_baseline():
    policy = make_policy(healthy_probes_to_fail_back=2)
    calibrate(policy)
    fail_over(policy)
    policy.record_probe(PROBE_S, PROBE_UNITS)
    assert policy.record_probe(PROBE_S * 1.5, PROBE_UNITS) is None  # 50% over the canary's normal
    assert policy.snapshot()["targets"]["primary"]["healthy_streak"] == 0
    assert policy.record_probe(PROBE_S * 1.2, PROBE_UNITS) is None  # at the limit: healthy
    event = policy.record_probe(PROBE_S, PROBE_UNITS)
    assert event is not None and event.kind == "failback"


def test_recovery_probe_without_own_probe_baseline_uses_the_other_targets():
    policy = make_policy(healthy_probes_to_fail_back=1)
    fail_over(policy)  # the primary was never calibrated
    calibrate(policy)  # the standby was, while serving
    assert policy.record_probe(PROBE_S * 2, PROBE_UNITS) is None  # 2x the standby's canary cost
    event = policy.record_probe(PROBE_S, PROBE_UNITS)
    assert event is not None and event.kind == "failback"
    assert "standby's probe baseline" in event.reason


def test_probes_are_due_an_interval_after_the_previous_one_started():
    clock = FakeClock()
    policy = make_policy(clock, probe_interval_s=10)
    calibrate(policy)
    fail_over(policy)
    assert policy.seconds_until_next_probe() == pytest.approx(10)
    clock.advance(10)
    started = clock.now
    clock.advance(4)  # a slow probe
    policy.record_probe(PROBE_S, PROBE_UNITS, started_at=started)
    assert policy.seconds_until_next_probe() == pytest.approx(6)
    clock.advance(6)
    assert policy.probe_due()


def test_probe_timeout_defaults_to_the_interval():
    assert FailoverSettings(probe_interval_s=7).effective_probe_timeout_s == 7
    assert FailoverSettings(probe_interval_s=7, probe_timeout_s=3).effective_probe_timeout_s == 3
    assert make_policy(probe_interval_s=2).snapshot()["probe"]["timeout_s"] == 2


# ---- both degraded -------------------------------------------------------------------


def test_both_degraded_keeps_serving_the_less_bad_target():
    clock = FakeClock()
    policy = make_policy(clock)
    fail_over(policy)  # primary at 1.5x
    # The standby degrades too, but less (1.3x): stay on it, and alert.
    events = [policy.record("standby", NORMAL * 1.3, UNITS) for _ in range(3)]
    assert events[:2] == [None, None]
    alert = events[2]
    assert alert is not None and alert.kind == "both_degraded"
    assert (alert.from_target, alert.to_target) == ("standby", "standby")
    assert not alert.switched
    assert "both degraded" in alert.reason
    assert policy.state == "both_degraded"
    assert policy.active == "standby"
    assert policy.probe_target == "primary"
    # Still bad: no new alert while the choice does not change, and always a target.
    for _ in range(6):
        assert policy.record("standby", NORMAL * 1.3, UNITS) is None
        assert policy.active in ("primary", "standby")


def test_both_degraded_moves_to_the_primary_when_its_probes_look_better():
    policy = make_policy(healthy_probes_to_fail_back=5)
    fail_over(policy)
    for _ in range(3):
        policy.record_probe(NORMAL * 1.25, UNITS)  # primary: a bit slow
    events = [policy.record("standby", 0.0, UNITS, ok=False) for _ in range(3)]  # standby: failing
    alert = events[2]
    assert alert is not None and alert.kind == "both_degraded"
    assert (alert.from_target, alert.to_target) == ("standby", "primary")
    assert policy.active == "primary" and policy.state == "both_degraded"
    assert policy.probe_target == "standby"
    # The primary keeps serving at 1.25x; the still-failing standby is never chosen.
    for _ in range(9):
        policy.record("primary", NORMAL * 1.25, UNITS)
        assert policy.active == "primary"


def test_both_degraded_switches_when_the_serving_target_gets_worse():
    policy = make_policy(healthy_probes_to_fail_back=5)
    fail_over(policy)
    for _ in range(3):
        policy.record("standby", NORMAL * 2.0, UNITS)  # standby worse than primary's 1.5x
    assert policy.state == "both_degraded" and policy.active == "primary"
    for _ in range(3):
        policy.record_probe(NORMAL * 1.3, UNITS)  # standby probes: better now
    events = [policy.record("primary", NORMAL * 3.0, UNITS) for _ in range(3)]
    assert events[2] is not None and events[2].to_target == "standby"
    assert policy.active == "standby"


def test_both_degraded_recovers_when_the_primary_probes_healthy():
    policy = make_policy(healthy_probes_to_fail_back=2)
    fail_over(policy)
    for _ in range(3):
        policy.record("standby", NORMAL * 1.3, UNITS)
    assert policy.state == "both_degraded" and policy.active == "standby"
    policy.record_probe(NORMAL, UNITS)
    event = policy.record_probe(NORMAL, UNITS)
    assert event is not None and event.kind == "failback"
    assert policy.active == "primary" and policy.state == "healthy"


def test_both_degraded_primary_serving_recovers_with_healthy_calls():
    policy = make_policy(healthy_probes_to_fail_back=2)
    fail_over(policy)
    for _ in range(3):
        policy.record("standby", NORMAL * 2.0, UNITS)
    assert policy.active == "primary" and policy.state == "both_degraded"
    assert policy.record("primary", NORMAL, UNITS) is None
    event = policy.record("primary", NORMAL, UNITS)
    assert event is not None and event.kind == "failback" and not event.switched
    assert policy.state == "healthy"


def test_both_degraded_standby_recovers_while_primary_still_bad():
    policy = make_policy(healthy_probes_to_fail_back=2)
    fail_over(policy)
    for _ in range(3):
        policy.record("standby", NORMAL * 2.0, UNITS)
    assert policy.active == "primary"
    policy.record_probe(NORMAL, UNITS)
    event = policy.record_probe(NORMAL, UNITS)  # standby probes healthy
    assert event is not None and event.kind == "failover"
    assert (event.from_target, event.to_target) == ("primary", "standby")
    assert policy.state == "failed_over" and policy.probe_target == "primary"


# ---- snapshot and settings -----------------------------------------------------------


def test_snapshot_is_json_serialisable_and_bounded():
    clock = FakeClock()
    policy = make_policy(clock, history_size=4, switch_history_size=2, healthy_probes_to_fail_back=1)
    for _ in range(3):  # three fail-over / fail-back cycles: six events
        fail_over(policy)
        policy.record("standby", 0.0, UNITS, ok=False)  # an error: shows up as null
        clock.advance(10)
        policy.record_probe(NORMAL, UNITS)
    snap = policy.snapshot()
    decoded = json.loads(json.dumps(snap, allow_nan=False))
    assert set(decoded) == {"active", "state", "settings", "targets", "probe", "switches"}
    assert decoded["active"] == "primary" and decoded["state"] == "healthy"
    assert len(decoded["targets"]["primary"]["recent_s_per_unit"]) == 4
    assert decoded["targets"]["standby"]["recent_s_per_unit"] == [None, None, None]
    assert [e["kind"] for e in decoded["switches"]] == ["failover", "failback"]
    assert set(decoded["switches"][0]) == {
        "time", "kind", "from_target", "to_target", "reason",
        "latency_s_per_unit", "baseline_s_per_unit",
    }
    assert decoded["probe"]["probes"] == 3
    assert decoded["targets"]["primary"]["trips"] == 3


def test_defaults_are_the_product_rule():
    settings = FailoverSettings()
    assert settings.threshold_ratio == 1.2
    assert settings.consecutive_breaches == 3
    assert settings.baseline_s_per_unit is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold_ratio", 0.9),
        ("threshold_ratio", 1.0),
        ("consecutive_breaches", 0),
        ("baseline_s_per_unit", 0.0),
        ("learn_calls", 0),
        ("baseline_ema_alpha", 1.5),
        ("probe_interval_s", 0),
        ("probe_timeout_s", 0),
        ("probe_learn_calls", 0),
        ("healthy_probes_to_fail_back", 0),
        ("history_size", 0),
        ("switch_history_size", 0),
    ],
)
def test_settings_validation_names_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        FailoverSettings(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)
    assert field in str(info.value)


def test_settings_reject_unknown_fields():
    with pytest.raises(ValidationError, match="treshold_ratio"):
        FailoverSettings(treshold_ratio=1.5)


def test_every_setting_is_described():
    for name, field in FailoverSettings.model_fields.items():
        assert field.description, name


def test_concurrent_records_are_all_counted():
    policy = make_policy()

    def worker():
        for _ in range(500):
            policy.record("primary", NORMAL, UNITS)
            policy.snapshot()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert policy.snapshot()["targets"]["primary"]["calls"] == 8 * 500
    assert policy.active == "primary"
