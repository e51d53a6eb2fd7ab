"""The README and the guides against the project: every command the README shows is run, here
or by a named test (or by CI), and every relative link in README.md and docs/ leads somewhere.

The README's `curl` and `sepconv-classify` commands run verbatim (only the port changes)
against the server that `make serve` starts, given a tiny model instead of the trained one.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import urllib.request
from functools import cache
from pathlib import Path

import pytest

from bench.server import free_port

from .waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: What the README's commands address; the tests swap in the test server's ports.
README_HTTP, README_GRPC = "localhost:8000", "127.0.0.1:8001"

#: README commands run by a test elsewhere (or by CI), by the test that runs them.
COVERED = {
    "make test": "tests/test_docs.py::test_make_test_is_what_ci_runs",
    "make test-fast": "tests/test_docs.py::test_make_test_is_what_ci_runs",
    "make serve": "tests/test_docs.py::test_readme_curl_commands_answer",
    "pip install 'sepconv-serve[client]'": (
        "tests/test_dependencies.py::test_every_import_comes_from_the_install_that_runs_it"
    ),
}
#: README commands, by their program, that this file runs verbatim.
RUN_HERE = {
    "curl": "tests/test_docs.py::test_readme_curl_commands_answer",
    "sepconv-classify": "tests/test_docs.py::test_readme_client_commands_answer",
}
#: How an inline `code span` in the README's prose is told to be a command.
PROGRAMS = ("make", "curl", "python", ".venv/bin/", "sepconv-", "pip", "docker", "kubectl")

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(markdown: str) -> list[str]:
    """Every command in the ```bash blocks (continuation lines joined, comments dropped), then
    every inline code span in the prose that starts with a program and has an argument."""
    commands = []
    for lang, body in FENCE.findall(markdown):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = " ".join(strip_comment(line.removeprefix("$ ")).split())
            if command:
                commands.append(command)
    prose = FENCE.sub("", markdown)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(PROGRAMS) and " " in span.strip():
            commands.append(" ".join(span.split()))
    return list(dict.fromkeys(commands))


def readme_commands(program: str) -> list[str]:
    return [c for c in shell_commands(README.read_text()) if c.split()[0] == program]


def test_the_extractor_finds_commands_and_drops_comments():
    text = (
        "Run `make serve` or `sepconv-classify` (a name), then `python -m x --y`.\n\n"
        "```bash\nmake serve   # serves\ncurl -s 'a#b' \\\n  -d x | grep '^y'\n```\n"
        "```\nnot a command\n```\n"
    )
    assert shell_commands(text) == [
        "make serve",
        "curl -s 'a#b' -d x | grep '^y'",
        "python -m x --y",
    ]


def test_every_readme_command_is_run_by_a_test():
    commands = shell_commands(README.read_text())
    assert len(commands) >= 8, commands
    uncovered = [c for c in commands if c not in COVERED and c.split()[0] not in RUN_HERE]
    assert not uncovered, f"README commands no test runs (add to tests/test_docs.py): {uncovered}"
    stale = set(COVERED) - set(commands)
    assert not stale, f"COVERED names commands the README no longer shows: {stale}"
    for test_id in {*COVERED.values(), *RUN_HERE.values()}:
        assert names_a_test(test_id), f"{test_id} does not exist"


def names_a_test(test_id: str) -> bool:
    path, _, name = test_id.partition("::")
    tree = ast.parse((ROOT / path).read_text())
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in tree.body
    )


# --- make -------------------------------------------------------------------------------------


def make_dry_run(*args: str) -> list[str]:
    """The commands `make ARGS` would run, printed by `make -n` (nothing is run)."""
    # Under `make test` this is a sub-make: without its parent's flags, nor directory banners.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def test_make_test_is_what_ci_runs():
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci[-1] == "make test"
    full, fast = make_dry_run("test"), make_dry_run("test-fast")
    for lines in (full, fast):
        assert "bash scripts/setup.sh" in lines
        assert any(line.endswith("ruff check .") for line in lines)
        assert any(line.endswith("ruff format --check .") for line in lines)
    assert full[-1].endswith("-m pytest -q")
    pytest_line = fast[-1]
    assert "-m pytest -q -m" in pytest_line
    # test-fast leaves out exactly the registered markers of the tests that start Docker or
    # HAProxy, and those markers are in use.
    expression = shlex.split(pytest_line)[-1]
    left_out = set(re.findall(r"not (\w+)", expression))
    assert left_out == {"e2e", "load_balancer"}
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0] for m in markers["markers"]}
    assert left_out <= registered
    suite = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for marker in left_out:
        assert f"pytest.mark.{marker}" in suite


# --- the README's commands against the server `make serve` starts ----------------------------


class MakeServe:
    """The command `make serve` runs once setup is done and the model exists, run for real with
    the tiny test model, on free loopback ports."""

    def __init__(self, model: Path) -> None:
        lines = make_dry_run("serve", f"MODEL={model}", f"PY={sys.executable}")
        assert lines[0] == "bash scripts/setup.sh", lines
        (self.command,) = [line for line in lines if line.endswith("-m service")]
        assert self.command.startswith(f"SEPCONV_MODEL_PATH={model} "), self.command
        self.http, self.grpc = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEPCONV_")}
        env |= {
            "SEPCONV_PORT": str(self.http),
            "SEPCONV_GRPC_PORT": str(self.grpc),
            "SEPCONV_WORKERS": "1",
            "SEPCONV_LOG_LEVEL": "warning",
        }
        self.proc = subprocess.Popen(
            ["bash", "-c", self.command], cwd=ROOT, env=env, start_new_session=True
        )
        wait_until(self.ready, "the server `make serve` runs did not get ready", timeout_s=60)

    def ready(self) -> bool:
        assert self.proc.poll() is None, "the server exited during start-up"
        try:
            url = f"http://127.0.0.1:{self.http}/readyz"
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tiny_model_path):
    server = MakeServe(tiny_model_path)
    yield server
    server.stop()


def run_shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_readme_curl_commands_answer(served):
    commands = readme_commands("curl")
    assert len(commands) >= 3, commands
    for command in commands:
        assert README_HTTP in command, command
        done = run_shell(command.replace(README_HTTP, f"127.0.0.1:{served.http}"))
        assert done.returncode == 0 and done.stdout.strip(), (command, done.stderr)
        out = done.stdout
        if out.startswith(("{", "[")):
            body = json.loads(out)
            assert "error" not in body, (command, body)
        if "/v1/classify" in command:
            (result,) = body["results"]
            top_k = int(re.search(r"top_k=(\d+)", command).group(1))
            assert len(result["predictions"]) == top_k
        if "/v1/models" in command:
            assert body["labels"] and body["input"]["size"] == 28
        if "format=markdown" in command:
            assert "Cost report" in out and "| Conv 1x1 |" in out
        if "/metrics" in command:
            assert out.startswith("sepconv_images_classified_total{"), out


def client_argv(command: str, served: MakeServe) -> list[str]:
    """A README `sepconv-classify` command as the test runs it: the same arguments, through
    `python -m service.client` (what the entry point is), at the test server's ports."""
    args = shlex.split(command)[1:]
    if "--url" in args:
        i = args.index("--url") + 1
        url = args[i]
        if url.startswith("grpc://"):
            assert url.endswith(README_GRPC), command
            args[i] = url.replace(README_GRPC, f"127.0.0.1:{served.grpc}")
        else:
            args[i] = url.replace(README_HTTP, f"127.0.0.1:{served.http}")
    else:
        args += ["--url", f"http://127.0.0.1:{served.http}"]
    return [sys.executable, "-m", "service.client", *args]


def test_readme_client_commands_answer(served):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sepconv-classify"] == "service.client.cli:main"
    commands = readme_commands("sepconv-classify")
    assert len(commands) >= 2, commands
    samples = sorted(p for p in (ROOT / "samples").glob("*.png"))
    assert len(samples) == 10
    for command in commands:
        done = subprocess.run(
            client_argv(command, served), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        lines = done.stdout.splitlines()
        if "--json" in command:
            records = [json.loads(line) for line in lines]
            assert len(records) == len(samples)
            assert all(r["predictions"] for r in records)
        else:
            blocks = [line for line in lines if not line.startswith("  ")]
            assert blocks, command
            if " -k " in f"{command} ":
                k = int(shlex.split(command)[shlex.split(command).index("-k") + 1])
                assert len(lines) == len(blocks) * (k + 1), done.stdout


# --- links -----------------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def test_slugs_follow_github():
    assert slug("The sweep (`python -m bench`)") == "the-sweep-python--m-bench"
    assert slug("INT8 (`model/quantize.py`)") == "int8-modelquantizepy"
    assert slug("What was validated here, and what needs a cluster") == (
        "what-was-validated-here-and-what-needs-a-cluster"
    )


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto: another site's business
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        anchored = anchor and resolved.suffix == ".md"
        if not resolved.exists() or (anchored and anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_every_guide_is_linked_from_the_readme():
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for target in LINK.findall(README.read_text())
    }
    guides = {p.resolve() for p in DOCS.glob("*.md")}
    assert not guides - linked, sorted(p.name for p in guides - linked)


def test_measured_results_live_in_docs_results():
    """Reports the benchmarks write go to docs/results/, not beside the guides."""
    loose = [
        p.name
        for p in DOCS.iterdir()
        if p.is_file() and (p.suffix in (".png", ".json") or p.stem.endswith("_results"))
    ]
    assert not loose, loose


# --- reference tables against the code ------------------------------------------------------


def test_operations_guide_lists_every_metric_with_its_labels_and_type():
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics

    guide = (DOCS / "operations.md").read_text()
    section = guide.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(sepconv_\w+)(?:\{([\w,]*)\})?` \| ([\w ()]+) \|", section, re.M)
    documented = {
        name: (tuple(filter(None, labels.split(","))), kind) for name, labels, kind in rows
    }
    served = {}
    for metric in vars(service.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            kind = type(metric).__name__.lower()
            name = metric._name + ("_total" if kind == "counter" else "")
            served[name] = (tuple(metric._labelnames), kind)
    assert set(documented) == set(served), (
        f"missing: {sorted(set(served) - set(documented))}, "
        f"not served: {sorted(set(documented) - set(served))}"
    )
    for name, (labels, kind) in served.items():
        shown_labels, shown_kind = documented[name]
        assert shown_labels == labels, name
        assert kind in shown_kind, name


def test_protocols_guide_lists_every_error_code():
    """Each `error` code the server answers with is in docs/protocols.md's table of them."""
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    raised = set(re.findall(r'\bcode(?:, status_code)? ?= ?"([a-z_]+)"', source))
    assert {"invalid_image", "overloaded", "not_found"} <= raised, raised
    guide = (DOCS / "protocols.md").read_text()
    table = [line for line in guide.splitlines() if re.match(r"\| \d{3} \| `", line)]
    listed = {code for line in table for code in re.findall(r"`([a-z_]+)`", line.split("|")[2])}
    assert not raised - listed, sorted(raised - listed)
