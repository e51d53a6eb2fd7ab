"""The optimisation sweep: resumable, measured per model file, reported with a Pareto frontier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model import sweep
from model.sweep_report import findings, pareto_frontier, render_markdown, write_plot


class FakeBuilder:
    """Stands in for a build: copies a tiny export, as ``python -m model build`` would write."""

    def __init__(self, model: Path):
        self.model = model
        self.calls: list[str] = []

    def __call__(self, recipe: str, settings: dict, out: Path) -> int:
        from sepconv.spec import read_spec, write_spec

        self.calls.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.model, out / "model.onnx")
        if settings.get("int8"):
            shutil.copy(self.model, out / "model.int8.onnx")
            spec = read_spec(str(self.model)).model_copy(update={"precision": "int8"})
            write_spec(out / "model.int8.onnx", spec)
        return 0


TIMING = {"latency_ms_b1": 0.5, "images_per_s_b32": 1000.0, "ort_threads": 2}


@pytest.fixture(autouse=True)
def fast_timing(monkeypatch):
    """Timing is bench/'s business: here every model takes 0.5 ms, and rounds are counted."""
    calls = []
    monkeypatch.setattr(sweep, "measure_latency", lambda path, seconds: dict(TIMING))

    def together(paths, seconds):
        calls.append(len(paths))
        return {str(p): dict(TIMING, latency_ms_b1=0.25) for p in paths}

    monkeypatch.setattr(sweep, "time_together", together)
    return calls


def test_a_second_run_builds_nothing_and_a_changed_setting_rebuilds(
    tiny_model_path, tmp_path, monkeypatch, fast_timing
):
    builder = FakeBuilder(tiny_model_path)
    out = tmp_path / "sweep"
    rows = sweep.run_sweep("smoke", out, builder=builder)
    plan = [v.name for v in sweep.SWEEPS["smoke"].variants]
    assert builder.calls == plan
    assert [r["variant"] for r in rows] == [plan[0], plan[0] + "-int8", *plan[1:]]
    first = rows[0]
    assert first["accuracy"] == 0.5 and first["mult_adds"] > 0 and first["params"] > 0
    assert rows[1]["precision"] == "int8"
    # Built, then all five models timed together; the shared figures are in the result files.
    assert fast_timing == [5] and all(r["latency_ms_b1"] == 0.25 for r in rows)
    result = json.loads((out / "sep-0.25" / sweep.RESULT_FILE).read_text())
    assert result["settings"]["int8"] is True and result["settings"]["alpha"] == 0.25
    pruned = json.loads((out / "sep-0.25-pruned-50" / sweep.RESULT_FILE).read_text())["settings"]
    assert pruned["init_checkpoint"] == str(out / "sep-0.25" / "checkpoint.pt")
    assert pruned["prune"] == 0.5 and pruned["epochs"] == 0
    kd = json.loads((out / "sep-0.25-kd" / sweep.RESULT_FILE).read_text())["settings"]
    assert kd["teacher"] == str(out / "std-0.25" / "model.onnx")

    # Resumed: every variant is done, nothing is built, the same rows come back.
    again = FakeBuilder(tiny_model_path)
    assert sweep.run_sweep("smoke", out, builder=again) == rows and again.calls == []
    assert fast_timing == [5]  # nothing built, nothing timed again
    sweep.run_sweep("smoke", out, builder=again, remeasure=True)
    assert fast_timing == [5, 5] and again.calls == []
    # An interrupted run: the variant without its done marker is the only one built.
    (out / "std-0.25" / sweep.RESULT_FILE).unlink()
    assert sweep.run_sweep("smoke", out, builder=again) == rows and again.calls == ["std-0.25"]
    # A teacher planned with other settings makes its student stale, though the student's own
    # settings are the same.
    import dataclasses

    smoke = sweep.SWEEPS["smoke"]
    variants = tuple(
        dataclasses.replace(v, settings={**v.settings, "lr": 0.1}) if v.name == "std-0.25" else v
        for v in smoke.variants
    )
    monkeypatch.setitem(sweep.SWEEPS, "smoke", dataclasses.replace(smoke, variants=variants))
    again.calls.clear()
    sweep.run_sweep("smoke", out, builder=again)
    assert again.calls == ["std-0.25", "sep-0.25-kd"]
    monkeypatch.setitem(sweep.SWEEPS, "smoke", smoke)
    # Other settings mean other models: everything is built again.
    again.calls.clear()
    sweep.run_sweep("smoke", out, builder=again, base={"seed": 1})
    assert again.calls == plan


def test_only_builds_a_variant_and_what_it_needs(tiny_model_path, tmp_path):
    builder = FakeBuilder(tiny_model_path)
    sweep.run_sweep("smoke", tmp_path, builder=builder, only=["sep-0.25-kd"])
    assert builder.calls == ["std-0.25", "sep-0.25-kd"]
    with pytest.raises(ValueError, match="unknown variant.*nope"):
        sweep.run_sweep("smoke", tmp_path, builder=builder, only=["nope"])


def test_a_failed_build_stops_the_sweep_without_a_done_marker(tiny_model_path, tmp_path):
    def failing(recipe, settings, out):
        out.mkdir(parents=True, exist_ok=True)
        return 1

    with pytest.raises(sweep.SweepError, match="sep-0.25 failed to build"):
        sweep.run_sweep("smoke", tmp_path, builder=failing)
    assert not (tmp_path / "sep-0.25" / sweep.RESULT_FILE).exists()

    def no_model(recipe, settings, out):
        out.mkdir(parents=True, exist_ok=True)
        return 0

    with pytest.raises(sweep.SweepError, match="left no"):
        sweep.run_sweep("smoke", tmp_path, builder=no_model)


def _row(name, acc, ms, **extra):
    return {"variant": name, "description": name, "accuracy": acc, "latency_ms_b1": ms,
            "images_per_s_b32": 1000 / ms, "mult_adds": int(1e6 * ms), "params": int(1e4 * ms),
            "precision": "int8" if name.endswith("int8") else "fp32", "conv": "separable",
            "prune_ratio": 0.0, "widths": [8, 16], "build_seconds": 60.0, **extra}  # fmt: skip


def test_pareto_frontier_and_report():
    rows = [
        _row("sep-0.25", 0.90, 1.0),
        _row("sep-0.5", 0.92, 2.0),
        _row("std-0.25", 0.91, 3.0),  # slower and less accurate than sep-0.5: dominated
        _row("sep-1.0", 0.93, 5.0),
        _row("sep-0.25-int8", 0.90, 1.0),  # ties sep-0.25 exactly: neither dominates
        _row("sep-0.25-kd", 0.89, 1.5),  # slower and worse than sep-0.25
    ]
    assert pareto_frontier(rows) == ["sep-0.25", "sep-0.25-int8", "sep-0.5", "sep-1.0"]
    said = findings(rows)
    assert any(s.startswith("**Standard instead of separable convs**") and "+1.00 points" in s
               and "3.00x the mult-adds" in s for s in said)  # fmt: skip
    assert any("Distillation" in s and "-1.00 points" in s for s in said)
    meta = {"recipe": "smoke", "recipe_note": "a note", "data": "d", "seed": 0, "out": "o",
            "ort_threads": 2, "machine": "m", "date": "today"}  # fmt: skip
    md = render_markdown(rows, meta, "optimization.png")
    assert "| `std-0.25` | std-0.25 | 91.00% | +1.00 |" in md
    assert (
        md.count("**yes**") == 4 and "![accuracy against batch-1 latency](optimization.png)" in md
    )


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("sep-0.25", 0.90, 1.0), _row("sep-1.0", 0.93, 5.0)]
    path = write_plot(rows, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", list(sweep.SWEEPS))
def test_every_planned_variant_is_a_valid_build(name, tmp_path):
    from model.recipes import resolve

    recipe = sweep.SWEEPS[name]
    seen = set()
    for variant in recipe.variants:
        for dep in (variant.prune_from, variant.teacher):
            assert dep is None or dep in seen, f"{variant.name} needs {dep} built before it"
        config = resolve(recipe.build_recipe, overrides=sweep.variant_settings(
            recipe, variant, tmp_path, {}))  # fmt: skip
        assert config.alpha == variant.settings["alpha"]
        seen.add(variant.name)


def test_sweep_subcommand_is_registered(capsys):
    from model import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "--help"])
    assert info.value.code == 0 and "--remeasure" in capsys.readouterr().out
