"""`vpo serve`: the trained optimizer as an autoscaled Ray Serve application.

Three ways to start the same application (deployments in serve/deployments.py):

    vpo serve --preset tiny --port 8000                         # this module, until Ctrl-C
    serve run vpo_ray/serve/serve_config.yaml                   # Serve CLI, config file
    serve run vpo_ray.serve.app:build_app preset=tiny max_batch_size=16
    serve deploy vpo_ray/serve/serve_config.yaml                # onto a running cluster

`build_app(args)` is the importable builder: `args` holds ServeConfig keys (dotted
`autoscaling.max_replicas` or nested mappings; strings parse as YAML scalars, as
`key=value` overrides do) and optionally `config: FILE`. A bearer token is read from
the env var named by `auth_token_env` (VPO_SERVE_TOKEN) where the app is built; only
its SHA-256 travels to the replicas, never the token.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from vpo_ray.config import ConfigError, ServeConfig, load_config, read_yaml_mapping

log = logging.getLogger(__name__)

DEFAULT_SERVE_YAML = Path(__file__).with_name("serve_config.yaml")
BUILDER = "vpo_ray.serve.app:build_app"


# ---------------------------------------------------------------------------- config

def _app_section(doc: dict, path: str) -> tuple[dict, dict]:
    """(vpo app args, http_options) of a Serve config file (one with `applications:`)."""
    apps = doc.get("applications") or []
    for app in apps:
        if isinstance(app, dict) and app.get("import_path") == BUILDER:
            args = dict(app.get("args") or {})
            if "route_prefix" in app and "route_prefix" not in args:
                args["route_prefix"] = app["route_prefix"]
            if "name" in app and "app_name" not in args:
                args["app_name"] = app["name"]
            return args, dict(doc.get("http_options") or {})
    raise ConfigError(f"{path}: no application with import_path {BUILDER}")


def config_from_args(args: dict) -> ServeConfig:
    """ServeConfig from builder args: optional `config` file, then keys (str values parse as YAML)."""
    args = dict(args or {})
    path = args.pop("config", None)
    fields: dict = {}
    if path:
        doc = read_yaml_mapping(path)
        if "applications" in doc:
            inner, http = _app_section(doc, path)
            inner.pop("config", None)
            fields.update({k: val for k, val in http.items() if k in ("host", "port")})
            fields.update(inner)
        else:
            fields.update(doc)
    overrides = []
    for k, val in args.items():
        if isinstance(val, str):
            overrides.append(f"{k}={val}")
        else:
            fields[k] = val
    # keys given by dotted name in `fields` go through load_config's dotted setter
    return load_config(ServeConfig, None, overrides, **fields)


def token_sha256(cfg: ServeConfig) -> Optional[str]:
    from vpo_ray.serve.deployments import token_digest

    token = os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None
    return token_digest(token) if token else None


def app_from_config(cfg: ServeConfig, token_digest: Optional[str] = None):
    """The Serve Application for `cfg` (token digest: default from the env var)."""
    from vpo_ray import storage
    from vpo_ray.config import replace
    from vpo_ray.serve import deployments

    # replicas need not share the builder's working directory: anchor relative local paths here
    if storage.is_local(cfg.render_out) and not os.path.isabs(storage.local_path(cfg.render_out)):
        cfg = replace(cfg, render_out=os.path.abspath(storage.local_path(cfg.render_out)))
    if cfg.model and not os.path.isabs(cfg.model) and os.path.isdir(cfg.model):
        cfg = replace(cfg, model=os.path.abspath(cfg.model))
    return deployments.build(cfg, token_digest if token_digest is not None else token_sha256(cfg))


def build_app(args: dict):
    """Serve application builder: `serve run vpo_ray.serve.app:build_app key=value ...`."""
    return app_from_config(config_from_args(args))


def http_options(cfg: ServeConfig) -> dict:
    # the proxy's own timeout sits past the ingress's, so clients get the ingress's JSON 504
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 5}


def start(cfg: ServeConfig, blocking: bool = False):
    """Start Ray (cfg.ray), Serve's HTTP proxy on cfg.host:cfg.port, and the application."""
    from ray import serve

    from vpo_ray.ray_utils import init_ray

    init_ray(cfg.ray)
    serve.start(http_options=http_options(cfg))
    return serve.run(app_from_config(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)


# ---------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="optimizer directory (an exported checkpoint); default: the preset's optimizer")
    p.add_argument("--preset", help="model preset (default tiny)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--config", help="ServeConfig YAML, or a Serve config file with a vpo_ray application "
                                    f"(e.g. {DEFAULT_SERVE_YAML.name})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. max_batch_size=16 autoscaling.max_replicas=4")


def config_from_cli(args: argparse.Namespace) -> ServeConfig:
    """--config file, then key=value overrides, then the explicit flags (they win)."""
    builder_args: dict[str, Any] = {}
    if args.config:
        builder_args["config"] = args.config
    for o in args.overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not key=value")
        k, val = o.split("=", 1)
        builder_args[k.strip()] = val
    for key in ("model", "preset", "port", "host"):
        val = getattr(args, key)
        if val is not None:
            builder_args[key] = val
    return config_from_args(builder_args)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(args)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not token_sha256(cfg):
        log.warning("vpo serve: binding %s, not loopback: set %s to require a token", cfg.host, cfg.auth_token_env)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from ray import serve

    try:
        start(cfg)
        auth = "bearer token required" if token_sha256(cfg) else f"no auth (set {cfg.auth_token_env or 'auth_token_env'})"
        print(f"vpo serve: http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1/optimize "
              f"(app {cfg.app_name}, {auth}); Ctrl-C stops", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("vpo serve: stopping", file=sys.stderr, flush=True)
        joined = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        try:  # on a shared cluster remove only this app; a local instance goes entirely
            serve.delete(cfg.app_name) if joined else serve.shutdown()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("stopping Serve failed: %s", e)
    return 0
