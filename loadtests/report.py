"""The load-test report: one PNG with four panels over time, and an HTML page around it.

Panels (x = seconds since the load started, stage boundaries marked):
  1. latency p50 / p95 / p99 per endpoint (Locust's current percentiles, from stats_history)
  2. throughput per endpoint (requests/s) with the number of users
  3. outcomes per second: answered, shed (429 / 503 with retry advice), failed
  4. replicas per deployment (RUNNING, sampled from Serve's status) against the users
"""

from __future__ import annotations

import csv
import html
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from loadtests.run import LoadRun

LATENCY_ENDPOINTS = ("generate", "jobs: submit", "jobs: status", "jobs: content", "jobs: finished")
PERCENTILES = (("50%", "-", "p50"), ("95%", "--", "p95"), ("99%", ":", "p99"))


def _num(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_locust_csv(prefix: Path, table: str) -> list[dict[str, str]]:
    """Rows of one of Locust's CSVs (`table`: stats, stats_history, failures); [] if it was not written."""
    path = Path(f"{prefix}_{table}.csv")
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _series(history: list[dict[str, str]], t0: float) -> dict[str, dict[str, list[float]]]:
    """Per endpoint name: time, users, requests/s, failures/s and percentiles."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in history:
        s = out[row["Name"]]
        s["t"].append(_num(row["Timestamp"]) - t0)
        s["users"].append(_num(row["User Count"]))
        s["rps"].append(_num(row["Requests/s"]))
        s["fps"].append(_num(row["Failures/s"]))
        for key, _style, _label in PERCENTILES:
            # Locust writes 0 for "no response in the current window": a gap, not a latency.
            value = _num(row.get(key, ""))
            s[key].append(math.nan if value == 0 else value)
    return out


def _outcomes(series: dict[str, dict[str, list[float]]]) -> dict[str, dict[float, float]]:
    """Per second: answered (as expected), shed and failed requests."""
    totals: dict[str, dict[float, float]] = {"answered": defaultdict(float), "shed": defaultdict(float),
                                             "failed": defaultdict(float)}
    for name, s in series.items():
        if name == "Aggregated" or name == "jobs: finished":
            continue  # a job's end-to-end entry repeats its requests
        for t, rps, fps in zip(s["t"], s["rps"], s["fps"]):
            rps, fps = (0.0 if math.isnan(v) else v for v in (rps, fps))
            if "(shed" in name:
                totals["shed"][t] += rps
            else:
                totals["answered"][t] += rps - fps
                totals["failed"][t] += fps
    return totals


def _stage_lines(ax, stages: list[dict], label: bool) -> None:
    start = 0.0
    for stage in stages:
        ax.axvline(stage["until_s"], color="0.75", linewidth=0.8, zorder=0)
        if label:
            ax.text((start + stage["until_s"]) / 2, 1.01, stage["name"], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.35")
        start = stage["until_s"]


def plot(run: "LoadRun", replica_rows: list[dict[str, Any]], path: Path) -> Path:
    """The four panels as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_locust_csv(run.csv_prefix, "stats_history")
    # Time zero = Locust's first statistics row, where the shape's stage clock starts.
    t0 = min((_num(row["Timestamp"]) for row in history), default=run.started)
    series = _series(history, t0)
    users = series.get("Aggregated", {})
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True, constrained_layout=True)
    fig.suptitle(f"vidgen-serve load test: {run.scenario.name} ({run.scenario.description})", fontsize=11)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0]
    for i, name in enumerate(n for n in LATENCY_ENDPOINTS if n in series):
        for key, style, label in PERCENTILES:
            ax.plot(series[name]["t"], [v / 1000 for v in series[name][key]], style, color=colors[i % len(colors)],
                    label=f"{name} {label}")
    ax.set_ylabel("latency (s)")
    ax.set_title("latency p50 / p95 / p99 per endpoint", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")

    ax = axes[1]
    for i, name in enumerate(n for n in sorted(series) if n != "Aggregated"):
        ax.plot(series[name]["t"], series[name]["rps"], color=colors[i % len(colors)], label=name)
    ax.set_ylabel("requests / s")
    ax.set_title("throughput per endpoint", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")

    ax = axes[2]
    outcomes = _outcomes(series)
    for (kind, values), color in zip(outcomes.items(), ("tab:green", "tab:orange", "tab:red")):
        times = sorted(values)
        ax.plot(times, [values[t] for t in times], color=color, label=f"{kind} / s")
    ax.set_ylabel("requests / s")
    ax.set_title("answered vs load shed (429 / 503 + Retry-After) vs failed", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[3]
    by_deployment: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for row in replica_rows:
        by_deployment[row["deployment"]].append((float(row["timestamp"]) - t0, float(row["running"]),
                                                 float(row["target"] or 0)))
    for i, (name, points) in enumerate(sorted(by_deployment.items())):
        # Offset the steps a little so deployments at the same count stay distinguishable.
        times = [p[0] for p in points]
        color = colors[i % len(colors)]
        ax.step(times, [p[1] + 0.03 * i for p in points], where="post", color=color, label=f"{name} running")
        if any(p[2] != p[1] for p in points):  # the autoscaler's target, where it differs
            ax.step(times, [p[2] + 0.03 * i for p in points], ":", where="post", color=color,
                    label=f"{name} target")
    ax.set_ylabel("replicas (RUNNING)")
    peak = max((max(p[1], p[2]) for points in by_deployment.values() for p in points), default=1)
    ax.set_ylim(0, peak + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("seconds since the load started")
    ax.set_title("replicas per deployment (Serve status) against the load", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")

    for i, ax in enumerate(axes):
        _stage_lines(ax, run.scenario.stages, label=i == 0)
        if i in (1, 3) and users:
            twin = ax.twinx()
            twin.fill_between(users["t"], users["users"], step="post", color="0.5", alpha=0.15, label="users")
            twin.set_ylabel("users", color="0.4")
            twin.set_ylim(bottom=0)
    axes[0].set_ylim(bottom=0)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(run: "LoadRun", replica_rows: list[dict[str, Any]], passed: bool, reasons: list[str]) -> Path:
    """report.png and report.html in the run's directory; returns the HTML's path."""
    png = plot(run, replica_rows, run.out / "report.png")
    rows = read_locust_csv(run.csv_prefix, "stats")
    cells = ("Name", "Request Count", "Failure Count", "50%", "95%", "99%", "Requests/s")
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in cells) + "</tr>" for row in rows)
    replicas: dict[str, list[int]] = defaultdict(list)
    for row in replica_rows:
        replicas[row["deployment"]].append(int(row["running"]))
    replica_table = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{run.min_replicas.get(name, '')}</td><td>{min(v)}</td><td>{max(v)}</td>"
        f"<td>{v[-1]}</td></tr>" for name, v in sorted(replicas.items()))
    verdict = "passed" if passed else "FAILED"
    reason_list = "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
    files = sorted(p.name for p in run.out.iterdir() if p.suffix in (".csv", ".log"))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vidgen-serve load test: {html.escape(run.scenario.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} td,th{{padding:2px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} .passed{{color:green}} .FAILED{{color:#b00}}</style></head><body>
<h1>Load test <code>{html.escape(run.scenario.name)}</code>: <span class="{verdict}">{verdict}</span></h1>
<p>{html.escape(run.scenario.description)}. Load for {run.ended - run.started:.0f} s in stages
{html.escape(", ".join(f"{s['name']} (until {s['until_s']} s: {s['users']} users)" for s in run.scenario.stages))}.
Shed answers (429, or 503 with retry advice) are listed as "&lt;name&gt; (shed &lt;status&gt;)" and are not failures;
any other unexpected status is.</p>
<ul>{reason_list}</ul>
<h2>Requests</h2>
<table><tr>{"".join(f"<th>{c}</th>" for c in cells)}</tr>{table}</table>
<p>Latencies in ms.</p>
<h2>Replicas per deployment (RUNNING)</h2>
<table><tr><th>deployment</th><th>configured min</th><th>lowest</th><th>highest</th><th>at the end</th></tr>
{replica_table}</table>
<h2>Over time</h2>
<img src="{png.name}" alt="latency, throughput, outcomes and replicas over time" style="max-width:100%">
<p>Files: {", ".join(html.escape(f) for f in files)}</p>
</body></html>
"""
    path = run.out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
