"""The web page at ``/``: the files as served, and the page itself in Debian's Chromium.

The browser test starts the real server on a free loopback port with the tiny session model and
drives ``/usr/bin/chromium`` headless through Playwright (never ``playwright install``: no
browser is downloaded). It leaves a screenshot in ``artifacts/test/web_ui.png``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from bench.server import ServerProcess
from service.api.app import ROUTERS, create_app
from service.api.routes import classify, ui
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "service" / "static"
SCREENSHOT = ROOT / "artifacts" / "test" / "web_ui.png"
CHROMIUM = Path("/usr/bin/chromium")
# What works headless here, as root, with no network: no sandbox (root), no GPU, nothing that
# phones home. Playwright gives every launch a fresh temporary profile (--user-data-dir).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PNG = {"content-type": "image/png"}
#: XML namespaces name a vocabulary; nothing is fetched from them.
NAMESPACES = {"http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def client(tiny_model_path):
    with TestClient(create_app(Settings(model_path=tiny_model_path, warmup_runs=1))) as c:
        yield c


# --------------------------------------------------------------------------- the files


MEDIA = {
    ".html": {"text/html"},
    ".js": {"text/javascript", "application/javascript"},
    ".css": {"text/css"},
    ".svg": {"image/svg+xml"},
}


@pytest.mark.parametrize(
    "path",
    ["/", "/favicon.ico", *(f"/static/{p.name}" for p in sorted(STATIC.iterdir()))],
)
def test_page_and_static_files_are_served(client, path):
    r = client.get(path)
    assert r.status_code == 200
    name = {"/": "index.html", "/favicon.ico": "favicon.svg"}.get(path, path.rsplit("/", 1)[-1])
    assert r.headers["content-type"].split(";")[0] in MEDIA[Path(name).suffix]
    assert r.content == (STATIC / name).read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"
    head = client.head(path)
    assert head.status_code == 200 and not head.content
    assert head.headers["content-length"] == r.headers["content-length"]
    # Revalidation is answered without the body.
    again = client.get(path, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_page_forbids_code_from_elsewhere(client):
    r = client.get("/")
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert '<script type="module" src="/static/app.js"></script>' in r.text


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/", "/static/..%2Fsettings.py"])
def test_unknown_static_paths_are_404s_in_json(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


def test_page_config_names_docs_and_dashboard(tiny_model_path, client):
    config = client.get("/ui/config").json()
    assert config == {
        "dashboard_url": "http://localhost:3000/d/sepconv-serve",
        "docs_url": "/docs",
        "version": client.app.version,
    }
    hidden = create_app(Settings(model_path=tiny_model_path, dashboard_url=""))
    assert TestClient(hidden).get("/ui/config").json()["dashboard_url"] == ""


@pytest.mark.parametrize("url", ["javascript:alert(1)", "localhost:3000", "http://a b", '/x"y'])
def test_dashboard_url_must_be_a_link(url):
    with pytest.raises(ValidationError, match="dashboard_url"):
        Settings(dashboard_url=url)


def _urls(text: str) -> set[str]:
    """Absolute and scheme-relative URLs, wherever they appear."""
    return set(re.findall(r"""(?:https?:)?//[^\s"'`<>)]+""", text))


def _refs(text: str) -> list[str]:
    """What HTML, CSS and our JS load or call: src/href, url(), imports, api()/fetch() paths."""
    refs = re.findall(r"""\b(?:src|href)="([^"]*)\"""", text)
    refs += re.findall(r"""\b(?:api|fetch|withModel)\(\s*"([^"]*)\"""", text)
    refs += re.findall(r"""\bfrom\s+"([^"]*)\"""", text)
    refs += re.findall(r"""url\(\s*['"]?([^'")]+)""", text)
    return refs


def _same_origin(ref: str) -> bool:
    return ref.startswith("/") and not ref.startswith("//")


@pytest.mark.parametrize("name", sorted(p.name for p in STATIC.iterdir()))
def test_static_files_reference_only_this_origin(name):
    text = (STATIC / name).read_text()
    foreign = {u for u in _urls(text) if u not in NAMESPACES and not u.startswith("// ")}
    assert not foreign, f"{name} refers to another origin: {sorted(foreign)}"
    refs = _refs(text)
    assert all(_same_origin(ref) for ref in refs), refs
    assert "@import" not in text and "import(" not in text
    if name == "app.js":
        assert {"/static/cost_chart.js", "/v1/classify", "/v1/cost", "/v1/models"} <= set(refs)


def test_the_checker_sees_foreign_urls():
    assert _urls('fetch("https://cdn.example.com/x.js")') == {"https://cdn.example.com/x.js"}
    assert _urls('<script src="//cdn.example.com/x.js">') == {"//cdn.example.com/x.js"}
    for text in ['import { a } from "x.js";', '<link href="css/x.css">', "url(img.png)"]:
        assert not all(_same_origin(ref) for ref in _refs(text)), text


def test_page_routes_come_after_the_api():
    assert ROUTERS[0] is classify.router and ROUTERS[-1] is ui.router
    # And none of them could shadow an API path.
    paths = {route.path for route in ui.router.routes}
    assert paths == {"/", "/static/{name:path}", "/favicon.ico", "/ui/config"}


def test_static_files_are_package_data():
    """The API image installs the package (not the source tree): the files must travel in it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    files = sorted(p.relative_to(ROOT / "service") for p in STATIC.rglob("*") if p.is_file())
    assert files and all(any(f.match(pattern) for pattern in patterns) for f in files), files
    assert {"index.html", "app.js", "style.css", "favicon.svg"} <= {f.name for f in files}


# --------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/setup.sh installs Debian's chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e .[test])"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("web_ui") / "server.log"
    env = {"SEPCONV_WORKERS": "1", "SEPCONV_WARMUP_RUNS": "1"}
    with ServerProcess(tiny_model_path, env, log, ready_timeout_s=60) as srv:
        yield srv


def test_page_in_chromium(server, browser, make_png):
    base = server.base_url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(base + "/")

        # The model card and the cost chart: one bar per layer, one outline per separable pair.
        page.wait_for_selector("#cost-chart svg rect.bar")
        cost = httpx.get(base + "/v1/cost").json()
        bars = page.eval_on_selector_all(
            "#cost-chart svg rect.bar", "els => els.map(e => e.getAttribute('data-layer'))"
        )
        assert sorted(bars) == sorted(layer["name"] for layer in cost["layers"])
        ghosts = page.locator("#cost-chart svg g.row rect.ghost").count()
        assert ghosts == len(cost["separable_pairs"]) > 0
        assert page.locator("#status").inner_text().lower() == "ready"
        info = httpx.get(base + "/v1/models").json()
        assert info["name"] in page.locator("#model-id").inner_text()
        assert page.locator("#labels li").all_inner_texts() == info["labels"]
        assert page.locator("#model-picker").is_hidden()  # one model: no picker

        # An uploaded PNG gets the label the API gives the same bytes.
        png = make_png(seed=7)
        top_k = info["num_classes"]  # the page clamps its default 5 to the class count
        expected = httpx.post(f"{base}/v1/classify?top_k={top_k}", content=png, headers=PNG)
        predictions = expected.json()["results"][0]["predictions"]
        # From the keyboard: Tab from the last control reaches the file input, Space opens it.
        page.focus("#top-k")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file-input"
        with page.expect_file_chooser() as chooser:
            page.keyboard.press(" ")
        chooser.value.set_files(
            files=[{"name": "sample.png", "mimeType": "image/png", "buffer": png}]
        )
        page.wait_for_selector("#result:not([hidden])")
        assert page.locator("#top-label").inner_text() == predictions[0]["label"]
        shown = page.eval_on_selector_all(
            "#predictions li", "els => els.map(e => e.getAttribute('data-label'))"
        )
        assert shown == [p["label"] for p in predictions]
        assert re.fullmatch(r"Answered in \d+\.\d ms.*", page.locator("#timing").inner_text())

        # Measured time per layer, on demand.
        page.click("#profile-button")
        page.wait_for_selector("#cost-chart svg rect.time", timeout=30_000)
        assert page.locator("#cost-chart svg rect.time").count() >= len(cost["layers"]) - 2
        assert "Time share" in page.locator("#shares thead").inner_text()
        assert not console_errors, console_errors
        assert not [url for url in requested if "model=" in url]  # one model: never named

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        with Image.open(SCREENSHOT) as shot:
            assert shot.width == 1280 and shot.height >= 900
            # Not a blank page: a drawn page has many colours.
            assert len(shot.convert("RGB").getcolors(1 << 20) or []) > 200
        assert SCREENSHOT.stat().st_size > 30_000

        # Images the server refuses: its own detail is shown.
        for name, mime, blob in [
            ("broken.png", "image/png", b"this is not an image"),
            ("notes.txt", "text/plain", b"hello"),
        ]:
            refused = httpx.post(
                f"{base}/v1/classify", content=blob, headers={"content-type": mime}
            )
            assert refused.status_code in (400, 415)
            page.set_input_files(
                "#file-input", files=[{"name": name, "mimeType": mime, "buffer": blob}]
            )
            error = page.locator("#classify-error")
            error.wait_for(state="visible")
            page.wait_for_function(
                "d => document.getElementById('classify-error').textContent.includes(d)",
                arg=refused.json()["detail"],
            )
            assert f"({refused.status_code} {refused.json()['error']})" in error.inner_text()
            assert page.locator("#result").is_hidden()

        # Several ready models: a picker, and the picked one named on every call.
        index = [
            {"name": "a", "version": "1", "state": "READY", "reason": ""},
            {"name": "b", "version": "2", "state": "READY", "reason": ""},
            {"name": "c", "version": "1", "state": "UNAVAILABLE", "reason": "loading"},
        ]
        page.route("**/v2/repository/index", lambda route: route.fulfill(json=index))

        def thousand_labels(route):  # and an ImageNet-sized label list
            response = route.fetch()
            body = {**response.json(), "labels": [f"class {i}" for i in range(1000)]}
            route.fulfill(response=response, json=body)

        page.route("**/v1/models*", thousand_labels)
        page.reload()
        page.locator("#model-picker").wait_for(state="visible")
        page.locator("#labels li.more").wait_for()
        chips = page.locator("#labels li").all_inner_texts()
        assert chips[0] == "class 0" and chips[-1] == f"+ {1001 - len(chips)} more"
        page.unroute("**/v1/models*")
        options = page.locator("#model-select option").all_inner_texts()
        assert options == ["Default model", "a · v1", "b · v2"]

        # The faked models do not exist on the server: their calls are answered by the one it
        # serves (the URL without its query), once the page has named the picked model.
        def as_served(route):
            route.fulfill(response=route.fetch(url=route.request.url.split("?", 1)[0]))

        for pattern in ("**/v1/models?*", "**/v1/cost?*", "**/v1/classify?*"):
            page.route(pattern, as_served)
        with page.expect_request("**/v1/cost?*") as picked:
            page.select_option("#model-select", label="b · v2")
        assert "model=b&version=2" in picked.value.url
        with page.expect_request("**/v1/classify?*") as sent:
            page.set_input_files(
                "#file-input", files=[{"name": "s.png", "mimeType": "image/png", "buffer": png}]
            )
        assert "model=b&version=2" in sent.value.url
        # Every fake off; a handler still answering a request the page just made is let be.
        page.unroute_all(behavior="ignoreErrors")

        # Not ready: a visible message, then the page recovers by itself.
        def not_ready(route):
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                json={"error": "not_ready", "detail": "the model is not loaded and warmed up yet"},
            )

        page.route("**/v1/models*", not_ready)
        page.reload()
        banner = page.locator("#banner")
        banner.wait_for(state="visible")
        assert "not ready (503): the model is not loaded and warmed up yet" in banner.inner_text()
        assert page.locator("#status").inner_text().lower() == "not ready"
        page.unroute("**/v1/models*")
        banner.wait_for(state="hidden", timeout=10_000)
        assert page.locator("#status").inner_text().lower() == "ready"
    finally:
        page.close()
