"""KubeRay manifests from one source: `serve_config.yaml` + a per-overlay override file.

The RayService's `serveConfigV2` is never written by hand. Each kustomize overlay
(`k8s/overlays/<name>/`) holds `serve-overrides.yaml` (what differs in that cluster:
profile, stores, GPU actor options, ...). `render` merges it over the repository's
`serve_config.yaml`, validates the result (Ray Serve's `ServeDeploySchema` and this
application's `ServeSettings`) and writes `serve-config.patch.yaml`, the kustomize patch
that sets `spec.serveConfigV2`. `check` re-renders without writing (drift), builds each
overlay with kustomize and validates every manifest: the RayService against the KubeRay
CRD schema with unknown fields as errors (Kubernetes would prune them silently), the
built-in kinds with `kubernetes-validate` in strict mode.
"""

from __future__ import annotations

import argparse
import copy
import functools
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import VidgenError

__all__ = [
    "CLUSTER_STATE_KEYS",
    "ManifestError",
    "add_arguments",
    "build_overlay",
    "check_serve_config",
    "crd_validator",
    "merge_config",
    "overlay_names",
    "overlay_serve_config",
    "render_overlay",
    "validate_manifests",
]

OVERRIDES_FILE = "serve-overrides.yaml"
PATCH_FILE = "serve-config.patch.yaml"
RAYSERVICE_NAME = "vidgen"
# Where the KubeRay CRD reference copy lives: beside the checkout, never inside it.
DEFAULT_CRD = Path("..") / "shared" / "ref" / "kuberay" / "ray.io_rayservices.yaml"
DEFAULT_KUBERNETES_VERSION = "1.32"
UPGRADE_STRATEGIES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
# Serve-config args for the cluster state (Redis jobs, S3 artifacts). Until `ServeSettings`
# defines them, validation skips exactly these keys and says so.
CLUSTER_STATE_KEYS = ("job_store", "artifact_store", "s3_endpoint_url", "s3_region", "artifact_redirect")


class ManifestError(VidgenError):
    """A serve config or manifest that cannot be rendered or does not validate (message names the field)."""

    def __init__(self, message: str):
        super().__init__(400, message, code="invalid_manifest")


# ---- merging and rendering ----------------------------------------------------------------


def merge_config(base: Any, override: Any) -> Any:
    """`override` merged over `base` (neither is modified).

    Mappings merge key by key; a key set to null in `override` is removed. Lists whose items
    are all mappings with a `name` (Serve's `applications` and `deployments`) merge item by
    item on `name`, new names appended in override order. Anything else is replaced.
    """
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_config(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(override):
        merged = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged)}
        for item in override:
            if item["name"] in index:
                merged[index[item["name"]]] = merge_config(merged[index[item["name"]]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(override)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


# libyaml's loader where PyYAML was built with it: the CRD is 18k lines.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ManifestError(f"{what} {str(path)!r}: no such file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{what} {str(path)!r}: not valid YAML ({exc})") from None


def overlay_names(k8s_dir: Path) -> list[str]:
    """Overlays under `k8s_dir/overlays` that carry a serve config override."""
    return sorted(p.parent.name for p in (k8s_dir / "overlays").glob(f"*/{OVERRIDES_FILE}"))


def overlay_serve_config(k8s_dir: Path, overlay: str, serve_config: Path) -> dict:
    """The serve config of one overlay: `serve_config` with the overlay's overrides merged in."""
    overlay_dir = k8s_dir / "overlays" / overlay
    if not overlay_dir.is_dir():
        raise ManifestError(f"overlay {overlay!r}: no directory {str(overlay_dir)!r} "
                            f"(overlays: {overlay_names(k8s_dir)})")
    base = _load_yaml(serve_config, "serve config")
    override = _load_yaml(overlay_dir / OVERRIDES_FILE, f"overlay {overlay!r}") or {}
    if not isinstance(base, dict) or not isinstance(override, dict):
        raise ManifestError(f"overlay {overlay!r}: the serve config and its overrides must be YAML mappings")
    return merge_config(base, override)


def _loc(parts: tuple | list) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_problems(exc: Any, prefix: str) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        where = _loc([prefix, *err["loc"]] if prefix else err["loc"])
        value = err.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        problems.append(f"{where}: {err['msg']} (got {shown[:80]})")
    return problems


def _unknown_serve_keys(config: dict) -> list[str]:
    """Keys Ray Serve's config models do not define. Serve ignores them on purpose (configs from
    newer versions still load), which turns a typo into a setting that silently does nothing."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema,
    )

    def unknown(value: Any, model: Any, where: str) -> list[str]:
        if not isinstance(value, dict):
            return []
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}.{key}: unknown field (Ray Serve would ignore it; known: {sorted(known)})"
                for key in value if key not in known]

    found = unknown(config, ServeDeploySchema, "(root)")
    found = [f.replace("(root).", "", 1) for f in found]
    found += unknown(config.get("http_options"), HTTPOptionsSchema, "http_options")
    for i, app in enumerate(config.get("applications") or []):
        found += unknown(app, ServeApplicationSchema, f"applications[{i}]")
        for j, dep in enumerate((app or {}).get("deployments") or []):
            where = f"applications[{i}].deployments[{j}]"
            found += unknown(dep, DeploymentSchema, where)
            found += unknown((dep or {}).get("ray_actor_options"), RayActorOptionsSchema, f"{where}.ray_actor_options")
            found += unknown((dep or {}).get("autoscaling_config"), AutoscalingConfig, f"{where}.autoscaling_config")
    return found


def check_serve_config(config: dict) -> list[str]:
    """Validate a serve config with Ray Serve's `ServeDeploySchema` and this app's `ServeSettings`.

    Returns notes about what could not be checked (cluster-state keys the installed
    `ServeSettings` does not define yet). Raises `ManifestError` naming every bad field.
    """
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from ..serve import deployment_defaults
    from ..serving.settings import ServeSettings

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise ManifestError("invalid serve config:\n  " + "\n  ".join(_pydantic_problems(exc, ""))) from None
    notes, problems = [], _unknown_serve_keys(config)
    for i, app in enumerate(schema.applications):
        for j, dep in enumerate(app.deployments):
            # Serve's schema keeps autoscaling_config as a plain dict; the controller would
            # reject a bad one only at deploy time, in the cluster.
            if isinstance(dep.autoscaling_config, dict):
                try:
                    AutoscalingConfig.model_validate(dep.autoscaling_config)
                except ValidationError as exc:
                    problems += _pydantic_problems(exc, f"applications[{i}].deployments[{j}].autoscaling_config")
        if app.import_path != "vidgen_serve.serve:build_app":
            continue  # another team's application: Serve's schema is all we know about it
        args = dict(app.args or {})
        unknown = [k for k in CLUSTER_STATE_KEYS if k in args and k not in ServeSettings.model_fields]
        for key in unknown:
            args.pop(key)
        if unknown:
            notes.append(f"applications[{i}].args: {', '.join(unknown)} not validated "
                         "(this version's ServeSettings does not define them yet)")
        try:
            settings = ServeSettings.model_validate(args)
        except ValidationError as exc:
            problems += _pydantic_problems(exc, f"applications[{i}].args")
            continue
        known = set(deployment_defaults(settings))
        for j, dep in enumerate(app.deployments):
            if dep.name not in known:
                problems.append(f"applications[{i}].deployments[{j}].name: {dep.name!r} is not a deployment "
                                f"of this application (allowed: {sorted(known)})")
    if problems:
        raise ManifestError("invalid serve config:\n  " + "\n  ".join(problems))
    return notes


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so the embedded serve config stays readable in the patch."""


def _str_presenter(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_presenter)


def serve_config_v2(config: dict) -> str:
    """The `serveConfigV2` text of a serve config (key order kept)."""
    return yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100)


@dataclass
class RenderResult:
    overlay: str
    path: Path
    text: str
    changed: bool
    notes: list[str] = field(default_factory=list)


def render_overlay(k8s_dir: Path, overlay: str, serve_config: Path, write: bool = True) -> RenderResult:
    """Render, validate and (optionally) write one overlay's `serve-config.patch.yaml`."""
    config = overlay_serve_config(k8s_dir, overlay, serve_config)
    try:
        notes = check_serve_config(config)
    except ManifestError as exc:
        raise ManifestError(f"overlay {overlay!r}: {exc}") from None
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME},
        "spec": {"serveConfigV2": serve_config_v2(config)},
    }
    text = (f"# Generated by `vidgen-serve k8s render` from {serve_config.name} + {OVERRIDES_FILE}.\n"
            "# Do not edit: change those files and render again (a test fails when this drifts).\n"
            + yaml.dump(patch, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100))
    path = k8s_dir / "overlays" / overlay / PATCH_FILE
    changed = not path.is_file() or path.read_text(encoding="utf-8") != text
    if write and changed:
        path.write_text(text, encoding="utf-8")
    return RenderResult(overlay, path, text, changed, notes)


# ---- building and validating ----------------------------------------------------------------


def kustomize_command() -> list[str]:
    """`kustomize build`, or kubectl's built-in kustomize when the standalone binary is absent."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise ManifestError("neither `kustomize` nor `kubectl` is on PATH: one is needed to build the overlays")


def build_overlay(overlay_dir: Path) -> list[dict]:
    """The manifests kustomize builds from one overlay directory."""
    result = subprocess.run([*kustomize_command(), str(overlay_dir)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ManifestError(f"kustomize build {str(overlay_dir)!r} failed: {result.stderr.strip()[-2000:]}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _strict(schema: Any) -> Any:
    """The CRD schema with Kubernetes' pruning made an error: objects admit only declared fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (out.get("type") == "object" and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=4)
def crd_validator(crd_path: Path, version: str = "v1"):
    """A jsonschema validator for RayService objects of the CRD at `crd_path` (root metadata left to Kubernetes)."""
    import jsonschema

    if not crd_path.is_file():
        raise ManifestError(f"KubeRay CRD {str(crd_path)!r}: no such file (the RayService schema is needed "
                            "to validate the manifests)")
    crd = _load_yaml(crd_path, "KubeRay CRD")
    try:
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    except (StopIteration, KeyError, TypeError):
        raise ManifestError(f"KubeRay CRD {str(crd_path)!r}: no schema for version {version!r}") from None
    schema = _strict(schema)
    # The object's own metadata is ObjectMeta, which the API server checks itself (and
    # `validate_manifests` checks with kubernetes-validate): the CRD declares no fields for it.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _name(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def _kubernetes_problems(doc: dict, version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{_name(doc)}: {_loc(list(exc.path)) or '(root)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{_name(doc)}: {exc.message}"]
    return []


def _rayservice_problems(doc: dict, validator, version: str) -> tuple[list[str], list[str]]:
    problems = [f"{_name(doc)}: {_loc(list(e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    # ObjectMeta checked as Kubernetes would, on a ConfigMap carrying the same metadata.
    meta = _kubernetes_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata") or {}},
                                version)
    problems += [p.replace(f"ConfigMap/{_name(doc).split('/', 1)[1]}", _name(doc), 1) for p in meta]
    spec = doc.get("spec") or {}
    strategy = (spec.get("upgradeStrategy") or {}).get("type")
    if strategy is not None and strategy not in UPGRADE_STRATEGIES:
        problems.append(f"{_name(doc)}: spec.upgradeStrategy.type: {strategy!r} is not one of {UPGRADE_STRATEGIES}")
    if strategy == "NewClusterWithIncrementalUpgrade" and "clusterUpgradeOptions" not in spec["upgradeStrategy"]:
        problems.append(f"{_name(doc)}: spec.upgradeStrategy.clusterUpgradeOptions is required by "
                        "NewClusterWithIncrementalUpgrade")
    notes = []
    if "serveConfigV2" not in spec:
        problems.append(f"{_name(doc)}: spec.serveConfigV2 is missing (render the overlay's {PATCH_FILE})")
    else:
        try:
            notes = check_serve_config(yaml.safe_load(spec["serveConfigV2"]))
        except ManifestError as exc:
            problems.append(f"{_name(doc)}: spec.serveConfigV2: {exc}")
    return problems, notes


def validate_manifests(docs: list[dict], crd_path: Path,
                       kubernetes_version: str = DEFAULT_KUBERNETES_VERSION) -> tuple[list[str], list[str]]:
    """Validate built manifests: (problems, notes). No cluster needed.

    RayServices go against the KubeRay CRD (strictly: an undeclared field is an error) and
    their serveConfigV2 against Serve's schema and `ServeSettings`; every other kind against
    the Kubernetes OpenAPI schemas of `kubernetes_version` with `kubernetes-validate --strict`.
    """
    problems, notes = [], []
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            problems.append(f"not a Kubernetes object: {str(doc)[:80]}")
        elif doc["apiVersion"].startswith("ray.io/"):
            if doc["kind"] != "RayService":
                problems.append(f"{_name(doc)}: only RayService objects are expected from ray.io")
                continue
            validator = crd_validator(Path(crd_path).resolve(), doc["apiVersion"].split("/", 1)[1])
            found, more = _rayservice_problems(doc, validator, kubernetes_version)
            problems += found
            notes += more
        else:
            problems += _kubernetes_problems(doc, kubernetes_version)
    return problems, notes


# ---- command line ------------------------------------------------------------------------------


def _overlays(args: argparse.Namespace) -> list[str]:
    names = overlay_names(Path(args.k8s_dir))
    if not names:
        raise ManifestError(f"no overlays with a {OVERRIDES_FILE} under {args.k8s_dir!r}/overlays")
    for name in args.overlay or []:
        if name not in names:
            raise ManifestError(f"--overlay {name!r}: unknown (overlays: {names})")
    return args.overlay or names


def cmd_render(args: argparse.Namespace) -> int:
    """Write (or with --check, compare) each overlay's serve-config patch."""
    stale = []
    for overlay in _overlays(args):
        result = render_overlay(Path(args.k8s_dir), overlay, Path(args.config), write=not args.check)
        for note in result.notes:
            print(f"note: {overlay}: {note}", file=sys.stderr)
        if args.check and result.changed:
            stale.append(str(result.path))
        elif not args.check:
            print(f"{result.path}: {'written' if result.changed else 'unchanged'}", file=sys.stderr)
    if stale:
        print("error: out of date (run `vidgen-serve k8s render`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Drift check, kustomize build and validation of every overlay; exit 1 on any problem."""
    failed = False
    for overlay in _overlays(args):
        result = render_overlay(Path(args.k8s_dir), overlay, Path(args.config), write=False)
        problems = [f"{result.path} is out of date (run `vidgen-serve k8s render`)"] if result.changed else []
        docs = build_overlay(Path(args.k8s_dir) / "overlays" / overlay)
        found, notes = validate_manifests(docs, Path(args.crd), args.kubernetes_version)
        problems += found
        for note in sorted(set(notes)):
            print(f"note: {overlay}: {note}", file=sys.stderr)
        for problem in problems:
            print(f"error: {overlay}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        print(f"{overlay}: {len(docs)} manifests, {'FAILED' if problems else 'valid'}", file=sys.stderr)
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `vidgen-serve k8s ...` subcommands (render, check)."""
    sub = parser.add_subparsers(dest="k8s_command", required=True)
    for name, func, help_text in (
        ("render", cmd_render, "render each overlay's serveConfigV2 patch from serve_config.yaml"),
        ("check", cmd_check, "drift check + kustomize build + schema validation of every overlay"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default="serve_config.yaml", help="the repository's serve config")
        p.add_argument("--k8s-dir", default="k8s", help="directory holding base/ and overlays/")
        p.add_argument("--overlay", action="append", help="only this overlay (repeatable; default: all)")
        p.set_defaults(func=func)
        if name == "render":
            p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a patch is out of date")
        else:
            p.add_argument("--crd", default=str(DEFAULT_CRD), help="KubeRay RayService CRD (YAML)")
            p.add_argument("--kubernetes-version", default=DEFAULT_KUBERNETES_VERSION,
                           help="Kubernetes version whose schemas the built-in kinds are checked against")
