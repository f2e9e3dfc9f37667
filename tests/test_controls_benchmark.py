"""`benchmarks/controls.py --quick`: every part of the creative-controls benchmark runs and its ratios parse."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "controls.py"
RATIO = re.compile(r"^ratio (?P<name>.+?): (?P<value>n/a|[0-9]+\.[0-9]+)(?:\s+\(goal <= [0-9.]+\))?$")


def test_quick_run_prints_every_ratio(tmp_path):
    out = tmp_path / "controls.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ratio ")]
    parsed = {}
    for line in lines:
        match = RATIO.match(line)
        assert match, line
        parsed[match["name"]] = None if match["value"] == "n/a" else float(match["value"])
    assert set(parsed) == {"per-second cost 3s / 1s (cpu)", "per-second cost 3s / 1s (wall)"} | {
        f"{part} / vae decode ({kind})" for part in ("grade", "camera move", "deflicker", "quality metrics")
        for kind in ("cpu", "wall")}
    for name, value in parsed.items():
        if value is None:
            assert name.startswith("quality metrics"), name  # only the metrics may be missing (another module)
        else:
            assert math.isfinite(value) and value >= 0, (name, value)
    assert parsed["per-second cost 3s / 1s (cpu)"] > 0
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["ratios"].keys() == parsed.keys()
    for name, value in report["ratios"].items():
        assert (value is None) == (parsed[name] is None) and (value is None or abs(value - parsed[name]) <= 5e-4)
