"""Before the server starts: what would keep it from ever serving, found at once and said in
one line (``python -m service`` exits 1 with it) rather than as a worker's traceback."""

from __future__ import annotations

import multiprocessing

from service.settings import Settings


def check_models(settings: Settings) -> str | None:
    """A model file that is missing or not ours, a repository that is not a folder, or a
    provider this onnxruntime lacks; None when none of these. (A repository whose models fail
    starts, not ready, so that they can be fixed and loaded without a restart.)"""
    from sepconv.spec import SpecError, read_spec
    from service.engine.layout import LayoutError, scan_repository
    from service.engine.runtime import ModelLoadError, choose_providers, find_model_file

    try:
        if settings.model_repository is not None:
            scan_repository(settings.model_repository)
        else:
            read_spec(str(find_model_file(settings.model_path)))
        choose_providers(settings.provider)
    except (ModelLoadError, SpecError, LayoutError) as exc:
        return str(exc)
    return None


def check_models_apart(settings: Settings) -> str | None:
    """:func:`check_models` in a child process: its imports (ONNX Runtime, numpy, onnx, about
    45 MB) would otherwise stay for the supervisor's whole life, where they serve nothing."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check_models, settings).result()


def preflight(settings: Settings, *, apart: bool = False) -> str | None:
    """Why the server cannot start, in one line, or None: the models (in a child process when
    ``apart``), and tracing turned on without its extra."""
    problem = check_models_apart(settings) if apart else check_models(settings)
    if problem is None and settings.tracing:
        from service.tracing import TracingUnavailable, check_available

        try:
            check_available()
        except (TracingUnavailable, ValueError) as exc:
            problem = str(exc)
    return problem
