"""``python -m service`` / ``sepconv-serve``: check the configuration, then run uvicorn
(one process, or ``SEPCONV_WORKERS`` of them under :mod:`service.supervisor`).

The model is checked before uvicorn starts, so a missing or corrupt file exits at once with one
clear line (status 1) instead of a lifespan traceback, as does ``SEPCONV_TRACING=true`` without
the ``tracing`` extra; a bad setting exits with status 2.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from service.logs import configure_logging, logging_config
from service.preflight import preflight
from service.settings import Settings

log = logging.getLogger("service")

# CLI flags become SEPCONV_* variables so that every uvicorn worker process sees them.
# The underscore spellings are KServe's model server conventions (--model_dir, --model_name,
# --http_port), so a ServingRuntime can pass its usual arguments.
FLAGS = {
    ("--model-path", "--model_dir"): "SEPCONV_MODEL_PATH",
    ("--model-name", "--model_name"): "SEPCONV_MODEL_NAME",
    ("--model-repository",): "SEPCONV_MODEL_REPOSITORY",
    ("--host",): "SEPCONV_HOST",
    ("--port", "--http_port"): "SEPCONV_PORT",
    ("--workers",): "SEPCONV_WORKERS",
    ("--provider",): "SEPCONV_PROVIDER",
    ("--log-level",): "SEPCONV_LOG_LEVEL",
    ("--grpc-port",): "SEPCONV_GRPC_PORT",
}


def _share_metrics_between_workers(workers: int) -> None:
    """Point prometheus_client's multiprocess mode at an empty directory.

    Must happen before a worker imports prometheus_client; uvicorn's workers inherit the
    environment. Files left by an earlier run would be counted again, so the directory is
    emptied (or created fresh and removed at exit).
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="sepconv-metrics-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    log.info("%d workers share metrics through %s", workers, path)


def _share_control_between_workers() -> None:
    """A fresh folder where the workers agree on model loads (service.engine.fleet); inherited
    by every worker through the environment."""
    path = os.environ.get("SEPCONV_CONTROL_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    else:
        path = tempfile.mkdtemp(prefix="sepconv-control-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["SEPCONV_CONTROL_DIR"] = path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sepconv-serve",
        description="Serve an ONNX MobileNetV1. Every setting is also a SEPCONV_* env var "
        "(see docs/serving.md).",
    )
    for flags, env in FLAGS.items():
        parser.add_argument(*flags, dest=env, help=f"overrides {env}")
    args = parser.parse_args(argv)
    for env in FLAGS.values():
        value = getattr(args, env)
        if value is not None:
            os.environ[env] = value

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"sepconv-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    workers = settings.resolved_workers
    problem = preflight(settings, apart=workers > 1)
    if problem is not None:
        print(f"sepconv-serve: cannot start: {problem}", file=sys.stderr)
        return 1

    import uvicorn

    from service.supervisor import reuseport_available, run_workers

    server_options = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's own lines get the request id and the format of the service's lines.
        log_config=logging_config(settings.log_level, settings.log_format),
        # The event loop does the per-request work; uvloop and httptools make it cheaper.
        loop="auto",
        http="auto",
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )
    if workers > 1:
        _share_metrics_between_workers(workers)
        _share_control_between_workers()
        if reuseport_available():
            grpc_ports = [settings.grpc_port] if settings.grpc_port else []
            return run_workers(
                workers,
                server_options,
                settings.drain_delay_s + settings.graceful_shutdown_s,
                grpc_ports,
            )
        # No SO_REUSEPORT (not Linux): uvicorn's own workers, without the drain delay.
        uvicorn.run("service.api.app:create_app", factory=True, workers=workers, **server_options)
        # uvicorn returns after a failed start-up instead of raising.
        return 0
    from service.server import serve

    return 0 if serve(settings, server_options) else 3


if __name__ == "__main__":
    sys.exit(main())
