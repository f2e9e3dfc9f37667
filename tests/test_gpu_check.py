"""`benchmarks/gpu_check.py --cpu-smoke`: every part of the GPU check at toy sizes on CPU, as CI runs it.

This is also the CPU equivalence test of regional compilation: the compiled denoiser (warmed up in
its constructor) gives the plain path's latents, and requests of other sizes compile nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def numbers(node, path=""):
    """(path, value) of every number in the report."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "smoke.json"
    # As on a GPU image: no Ray, no DeepSpeed (accelerate imports DeepSpeed when it is installed).
    site = tmp_path_factory.mktemp("gpu-image-site")
    (site / "sitecustomize.py").write_text("import sys\nsys.modules.update(ray=None, deepspeed=None)\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--window-schedules", "overlap,shifted",
                           "--out", str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout) == json.loads(out.read_text())  # one JSON document on stdout, the same in --out
    return json.loads(out.read_text())


def test_runs_every_part_without_errors(report):
    assert report["mode"] == "cpu-smoke" and report["errors"] == {}
    for part in ("device", "profile_end_to_end", "transformer", "speed_options", "text_encoder", "vae_decode", "post_processing",
                 "tiny_end_to_end", "goals"):
        assert report[part], part
    assert report["imported"] == {"ray": False, "deepspeed": False}  # single-GPU parts need neither
    for path, value in numbers(report):
        assert math.isfinite(value), path
        if path.endswith(("speedup", "seconds", "s_per_step", "_s", "tflops", "tflop_per_step")):
            assert value > 0, path


def test_transformer_numbers(report):
    for model, sizes in report["transformer"].items():
        for resolution, row in sizes.items():
            assert row["tokens"] > 0 and 0 < row["attention_share"] < 1, (model, resolution)
            # MFU is the step's FLOPs over its time over the peak (on CPU a measured matmul rate, which a
            # loaded machine can push either way: no bound on the value itself)
            expected = row["tflop_per_step"] / row["s_per_step"] / report["device"]["peak_tflops"]
            assert row["mfu"] > 0 and abs(row["mfu"] - expected) <= 1e-9 * expected
    small, large = report["transformer"]["tiny"]["480p"], report["transformer"]["tiny"]["720p"]
    assert large["tflop_per_step"] > small["tflop_per_step"]
    assert report["device"]["peak_source"] == "measured bf16 matmul"


def test_exact_options_match_the_plain_path(report):
    options = report["speed_options"]
    compile_ = options["compile"]
    assert compile_["exact"] and compile_["rel_diff"] < 0.01
    assert compile_["warm_up_s"] > 0 and compile_["compiles_during_requests"] == 0
    assert len(compile_["warm_up_log"]) == 4 and "took" in compile_["warm_up_log"][-1]  # three shapes, then the total
    assert all(row["compiles"] == 0 for row in compile_["requests"].values())
    for name, row in options["attention_backend"].items():
        assert row["exact"] and row["rel_diff"] < 0.05, name
    assert options["step_cache"]["off"]["max_abs_diff"] == 0.0  # off is the plain path, bit for bit


def test_approximate_options_stay_close(report):
    options = report["speed_options"]
    for mode in ("first_block", "taylorseer"):
        assert not options["step_cache"][mode]["exact"] and options["step_cache"][mode]["rel_diff"] < 0.2
    assert options["int8_weight_only"]["rel_diff"] < 0.1
    # int8 weights hold about half the bytes of bf16 ones (counted through torchao's inner tensors)
    assert 0.3 < options["int8_weight_only"]["weights_gib"] / report["transformer"]["tiny"]["480p"]["weights_gib"] < 0.8
    assert options["int8_weight_only"]["memory_saved_gib"] > 0
    assert "compute capability >= 8.9" in options["float8_dynamic"]["skipped"]  # CPU: no FP8
    for layout in ("cfg_parallel", "ulysses"):
        assert options[layout] == {"skipped": "needs >= 2 GPUs; 0 visible"}
    assert report["text_encoder"]["int8_weight_only"]["rel_diff"] < 0.1
    vae = report["vae_decode"]
    assert set(vae) == {"float32", "bfloat16", "bfloat16_tiled"}
    assert vae["bfloat16"]["mean_abs_diff_u8"] < 5 and vae["bfloat16_tiled"]["mean_abs_diff_u8"] < 10


def test_post_processing_and_end_to_end(report):
    post = report["post_processing"]
    assert post["mci_frames_exact"]
    assert post["mci_chunked_error"] <= post["mci_single_error"] * 1.01 + 0.01  # the same quality
    assert post["chunks"] >= 1
    e2e = report["tiny_end_to_end"]
    assert e2e["device"] == "cpu" and e2e["mp4_bytes"] > 1000
    assert set(report["goals"]["targets"]) >= {"end_to_end_50_steps_estimate_s", "mfu_480p"}


def test_profile_end_to_end_with_every_control(report):
    """The first profile through VideoPipeline: every output frame there, a picture with content, and the
    long video's cost per second of output reported against the short one's."""
    e2e = report["profile_end_to_end"]
    assert e2e["model"] == "tiny" and set(e2e["controls"]) >= {"motion_intensity", "color_palette", "camera_motion"}
    for case in ("short", "long"):
        row = e2e[case]
        assert row["output_frames"] == row["expected_frames"] > 0, case
        assert row["pixel_std"] > 1.0, case  # not a flat frame
        assert set(row["quality"]) == {"temporal_ssim", "temporal_psnr_db", "flicker"}, case
    assert e2e["long"]["windows"] >= e2e["short"]["windows"]
    ratio = e2e["long"]["s_per_output_s"] / e2e["short"]["s_per_output_s"]
    assert abs(e2e["long_over_short_per_second"] - ratio) < 1e-9


def test_profile_end_to_end_window_schedules(report):
    """--window-schedules overlap,shifted: the same pipeline with each schedule's plans; the short video is one
    window under both (run once), the long one alternates two tilings under 'shifted'; every output sane."""
    e2e = report["profile_end_to_end"]
    overlap, shifted = e2e["schedules"]["overlap"], e2e["schedules"]["shifted"]
    assert e2e["long"] == overlap["long"]  # the first schedule's rows are the top-level ones
    assert shifted["short"]["same_plan_as"] == "overlap" and len(shifted["short"]["window_lengths"]) == 1
    assert shifted["long"]["window_schedule"] == "shifted" and len(shifted["long"]["window_lengths"]) == 2
    assert overlap["long"]["window_schedule"] == "overlap" and len(overlap["long"]["window_lengths"]) == 1
    for rows in (overlap, shifted):
        for case in ("short", "long"):
            row = rows[case]
            assert row["latents_finite"] and row["latents_std"] > 0.1, case
            assert row["output_frames"] == row["expected_frames"] and row["min_frame_std"] > 1.0, case
        ratio = rows["long"]["denoise_s_per_output_s"] / rows["short"]["denoise_s_per_output_s"]
        assert abs(rows["denoise_long_over_short_per_second"] - ratio) < 1e-9
