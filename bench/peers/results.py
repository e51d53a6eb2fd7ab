"""From measured points to the comparison targets (issue 19's): medians, ratios, markdown.

Pure functions over the JSON the run writes, so the table can be rebuilt from
``docs/results/peers_results.json`` and tested on made-up numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from bench.peers.contenders import TITLES

#: (comparison key, what it divides, target operator, target value, models the target binds).
#: ``None`` models: the target holds for every model. No target: reported for information.
#: The targets are issue 19's: a lone request as fast as raw ONNX Runtime on every core, every
#: request under load near raw ORT's throughput, and ahead of every peer at both.
TARGETS: tuple[tuple[str, str, str | None, float | None, tuple[str, ...] | None], ...] = (
    (
        "c1_p50_vs_raw_lone",
        "sepconv /v1 c=1 p50 / raw ORT batch 1 on every core, p50 (lower is better)",
        "<=",
        1.15,
        ("224",),
    ),
    (
        "c1_p50_vs_best_peer",
        "sepconv /v1 c=1 p50 / the fastest peer's c=1 p50 (lower is better)",
        "<=",
        1.0,
        None,
    ),
    (
        "c32_v1_vs_raw",
        "sepconv /v1 c=32 req/s / raw ORT best img/s (decoding included on the server side)",
        ">=",
        0.95,
        ("224",),
    ),
    (
        "c32_oip_binary_vs_raw",
        "sepconv OIP binary c=32 req/s / raw ORT best img/s",
        ">=",
        0.95,
        ("224",),
    ),
    (
        "c32_vs_best_peer",
        "sepconv /v1 c=32 req/s / the best peer's c=32 req/s (each server's usual request)",
        ">=",
        2.0,
        ("default",),
    ),
    (
        "c32_vs_raw_batch",
        "sepconv /v1 c=32 req/s / raw ORT img/s at the server's max batch",
        ">=",
        0.12,
        ("default",),
    ),
    (
        "c32_vs_kserve",
        "sepconv c=32 req/s / KServe c=32 req/s (same OIP JSON request)",
        None,
        None,
        None,
    ),
    (
        "c1_p50_vs_fastapi",
        "sepconv c=1 p50 / plain FastAPI c=1 p50 (same /v1 request; lower is better)",
        None,
        None,
        None,
    ),
)
#: The peers' usual requests (what their users send), for "the best peer".
PEER_ROWS = ("fastapi/v1", "kserve/oip-json")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``"server/protocol" -> concurrency -> statistics``, the median over rounds.

    The median, not the best: other tenants of a shared machine make single rounds vary by
    10-20%, and a best-of would turn one lucky window into the result. Min and max of req/s
    and p50 are kept so the table can show the spread.
    """
    grouped: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for run in runs:
        key = f"{run['server']}/{run['protocol']}"
        for point in run["points"]:
            grouped.setdefault(key, {}).setdefault(point["concurrency"], []).append(point)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for key, levels in grouped.items():
        out[key] = {}
        for c, points in sorted(levels.items()):
            rates = [p["req_per_s"] for p in points]
            p50s = [p["p50_ms"] for p in points]
            out[key][c] = {
                "req_per_s": statistics.median(rates),
                "req_per_s_min": min(rates),
                "req_per_s_max": max(rates),
                "p50_ms": statistics.median(p50s),
                "p50_ms_min": min(p50s),
                "p50_ms_max": max(p50s),
                "p99_ms": statistics.median(p["p99_ms"] for p in points),
                "errors": sum(p["errors"] for p in points),
                "error_kinds": dict(
                    sum((Counter(p.get("error_kinds") or {}) for p in points), Counter())
                ),
                "rounds": len(points),
            }
    return out


def _get(rows: dict, key: str, c: int, field: str) -> float | None:
    value = rows.get(key, {}).get(c, {}).get(field)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def ratios(model_key: str, rows: dict, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every comparison whose two sides were measured, with its target where one binds."""
    throughput = [r for r in raw if r.get("role", "throughput") == "throughput"]
    best_raw = max(throughput, key=lambda r: r["images_per_s"]) if throughput else None
    raw_max_batch = max(throughput, key=lambda r: r["batch"]) if throughput else None
    lone = next((r for r in raw if r.get("role") == "lone"), None)
    peer_p50 = [v for v in (_get(rows, k, 1, "p50_ms") for k in PEER_ROWS) if v is not None]
    peer_rate = [v for v in (_get(rows, k, 32, "req_per_s") for k in PEER_ROWS) if v is not None]
    values = {
        "c1_p50_vs_raw_lone": (
            _get(rows, "sepconv/v1", 1, "p50_ms"),
            lone["batch_latency_ms_p50"] if lone else None,
            "ms",
        ),
        "c1_p50_vs_best_peer": (
            _get(rows, "sepconv/v1", 1, "p50_ms"),
            min(peer_p50) if peer_p50 else None,
            "ms",
        ),
        "c32_v1_vs_raw": (
            _get(rows, "sepconv/v1", 32, "req_per_s"),
            best_raw["images_per_s"] if best_raw else None,
            "/s",
        ),
        "c32_oip_binary_vs_raw": (
            _get(rows, "sepconv/oip-binary", 32, "req_per_s"),
            best_raw["images_per_s"] if best_raw else None,
            "/s",
        ),
        "c32_vs_best_peer": (
            _get(rows, "sepconv/v1", 32, "req_per_s"),
            max(peer_rate) if peer_rate else None,
            "req/s",
        ),
        "c32_vs_raw_batch": (
            _get(rows, "sepconv/v1", 32, "req_per_s"),
            raw_max_batch["images_per_s"] if raw_max_batch else None,
            "/s",
        ),
        "c32_vs_kserve": (
            _get(rows, "sepconv/oip-json", 32, "req_per_s"),
            _get(rows, "kserve/oip-json", 32, "req_per_s"),
            "req/s",
        ),
        "c1_p50_vs_fastapi": (
            _get(rows, "sepconv/v1", 1, "p50_ms"),
            _get(rows, "fastapi/v1", 1, "p50_ms"),
            "ms",
        ),
    }
    out = []
    for key, text, op, target, models in TARGETS:
        ours, theirs, unit = values[key]
        ratio = _div(ours, theirs)
        if ratio is None:
            continue
        binds = op is not None and (models is None or model_key in models)
        met = None
        if binds:
            met = ratio <= target if op == "<=" else ratio >= target
        out.append(
            {
                "key": key,
                "comparison": text,
                "ratio": round(ratio, 3),
                "ours": ours,
                "theirs": theirs,
                "unit": unit,
                "target": f"{op} {target:.2f}x" if binds else None,
                "met": met,
            }
        )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _spread(stats: dict[str, float], field: str, digits: int) -> str:
    text = _fmt(stats[field], digits)
    if stats["rounds"] > 1:
        text += f" ({_fmt(stats[field + '_min'], digits)}–{_fmt(stats[field + '_max'], digits)})"
    return text


def _errors(stats: dict[int, dict[str, Any]]) -> str:
    """Total non-2xx answers and failures over every point, by kind (``http_429`` etc.)."""
    kinds: Counter[str] = Counter()
    for s in stats.values():
        kinds.update(s.get("error_kinds") or {})
    total = sum(s["errors"] for s in stats.values())
    if not kinds:
        return str(total)
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# sepconv-serve against its peers",
        "",
        f"Generated by `{env['command']}` on {env['date']}.",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores available; load average "
        f"{env['load_before']} before the run, {env['load_after']} after. "
        + (env.get("note") or ""),
        f"- sepconv-serve: `python -m service --model-path M --port P`, no other setting and no "
        f"`SEPCONV_*` variable, so its defaults at commit {env['commit']}: "
        f"{env['sepconv_defaults']}.",
        f"- Plain FastAPI + ORT: `uvicorn bench.peers.plain_fastapi:create_app --factory`, "
        f"uvicorn's defaults (one process, access log on), ORT's defaults (all cores, "
        f"spinning on); fastapi {env['versions'].get('fastapi')}, uvicorn "
        f"{env['versions'].get('uvicorn')}.",
        f"- KServe {env['versions'].get('kserve') or '(not run)'}: a custom `kserve.Model` "
        f"(`bench/peers/kserve_model.py`) under `kserve.ModelServer` with its defaults (one "
        f"worker, gRPC on, latency log on), ORT's defaults, in its own venv.",
        f"- Every server runs onnxruntime {env['versions'].get('onnxruntime')} and the same "
        "`sepconv.preprocess` on the same model file. Requests: `v1` is the encoded image as "
        "the raw body of `POST /v1/classify` (PNG for the greyscale model, JPEG for RGB); "
        "`oip-json` is `POST /v2/models/{name}/infer` with the image base64-encoded in a BYTES "
        "input and the top 5 asked for through the classification extension, what KServe's "
        "examples send. Every answer was checked against the model before the load started.",
        f"- Closed loop, {env['duration_s']} s measured after {env['warmup_s']} s warm-up per "
        f"point, {env['rounds']} round(s), the median shown (min–max when several). The load "
        "generator (`bench/loadgen.py`) shares the cores with the server.",
        "",
    ]
    summary = []
    for model in results["models"]:
        rows = aggregate(model["runs"])
        levels = sorted({c for r in rows.values() for c in r})
        lines += [f"## {model['title']}", ""]
        head = ["server", "request"]
        for c in levels:
            head += [f"c={c} p50 ms", f"c={c} req/s"]
        head += [f"c={levels[-1]} p99 ms" if levels else "p99", "errors"]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for key, stats in rows.items():
            server, protocol = key.split("/", 1)
            cells = [TITLES.get(server, server), f"`{protocol}`"]
            for c in levels:
                s = stats.get(c)
                cells += [_spread(s, "p50_ms", 2), _spread(s, "req_per_s", 0)] if s else ["-"] * 2
            last = stats.get(levels[-1]) if levels else None
            cells += [_fmt(last["p99_ms"], 2) if last else "-"]
            cells += [_errors(stats)]
            lines.append("| " + " | ".join(cells) + " |")
        if model.get("raw"):
            lines += [
                "",
                "Raw ONNX Runtime in-process (`bench/raw_ort.py`, the server's "
                "default session settings, no decoding):",
                "",
            ]
            lines += ["| batch | sessions x threads | images/s | batch latency p50 ms |"]
            lines += ["|---:|---:|---:|---:|"]
            for r in model["raw"]:
                lines.append(
                    f"| {r['batch']} | {r['sessions']} x {r['intra_op_threads']} | "
                    f"{_fmt(r['images_per_s'])} | {_fmt(r['batch_latency_ms_p50'], 2)} |"
                )
        found = ratios(model["key"], rows, model.get("raw") or [])
        if found:
            lines += ["", "| comparison | ratio | measured | target | met |"]
            lines += ["|---|---:|---|---|:-:|"]
            for r in found:
                met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
                lines.append(
                    f"| {r['comparison']} | {r['ratio']:.2f}x | {_fmt(r['ours'], 2)} vs "
                    f"{_fmt(r['theirs'], 2)} {r['unit']} | {r['target'] or '-'} | {met} |"
                )
                if r["met"] is not None:
                    summary.append((model["key"], r))
        lines.append("")
    if summary:
        lines += ["## Targets (issue 19, defaults out of the box)", ""]
        lines += ["| model | comparison | ratio | target | met |", "|---|---|---:|---|:-:|"]
        for key, r in summary:
            met = "yes" if r["met"] else "**no**"
            lines.append(
                f"| {key} | {r['comparison']} | {r['ratio']:.2f}x | {r['target']} | {met} |"
            )
        lines.append("")
    return "\n".join(lines)
