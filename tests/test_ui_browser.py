"""The web UI in headless Chromium (Playwright driving the system's chromium): pick a VAE, upload an image, see the
reconstruction and its metrics; the latent channels, interpolation and comparison views; errors shown where the user
looks, in plain words, in their own view, clearing stale results; a phone-width layout; an axe-core accessibility
check; a screenshot is saved."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_server import library, photo, png_bytes, threaded_server  # noqa: F401  (library is a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (apt-get install -y chromium); the browser test needs it"
)


@pytest.fixture(scope="module")
def ui_server(library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    saved = {k: os.environ.get(k) for k in ("VAEKIT_CONFIG", "VAEKIT_HOME")}
    os.environ["VAEKIT_CONFIG"] = str(tmp_path_factory.mktemp("ui-config"))
    os.environ["VAEKIT_HOME"] = ""
    try:
        with threaded_server(library=library) as (url, _):
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def page(ui_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh profile every run
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            pg = browser.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(ui_server)
            yield pg
        finally:
            browser.close()


def test_roundtrip_in_the_browser(page, ui_server: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector("#vae option[value='small-taesd']", state="attached")
    assert page.input_value("#vae") == "small-sd1"  # the server's selection is shown
    with page.expect_response("**/vaes/select") as selected:
        page.select_option("#vae", "small-taesd")
    assert selected.value.ok
    assert httpx.get(f"{ui_server}/health").json()["selected"] == "small-taesd"  # like the SD VAE setting

    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(photo(96, 64, seed=21)))
    page.set_input_files("#rt-file", str(image))
    page.click("#rt-run")
    page.wait_for_selector("#rt-metrics:not([hidden])")
    metrics = page.inner_text("#rt-metrics")
    want = httpx.post(
        f"{ui_server}/roundtrip", params={"format": "json", "vae": "small-taesd"}, content=image.read_bytes()
    )
    psnr = want.json()["metrics"]["psnr"]
    assert f"{psnr:.2f} dB" in metrics and "SSIM" in metrics and "small-taesd" in metrics
    for img in ("#rt-original", "#rt-recon", "#rt-diff"):
        size = page.eval_on_selector(img, "e => [e.naturalWidth, e.naturalHeight]")
        assert size == [96, 64], img
    assert "done in" in page.inner_text("#rt-progress")
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("VAEKIT_UI_SCREENSHOT"):  # for the docs: VAEKIT_UI_SCREENSHOT=docs/images/ui.png
        shutil.copy(shot, os.environ["VAEKIT_UI_SCREENSHOT"])


def test_channels_interpolation_and_compare_views(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(png_bytes(photo(64, 48, seed=22)))
    b.write_bytes(png_bytes(photo(64, 48, seed=23)))
    page.click("nav .tab[data-tab=channels]")
    page.set_input_files("#ch-file", str(a))
    page.click("#ch-run")
    page.wait_for_selector("#ch-grid figure")
    assert page.locator("#ch-grid figure").count() == 4
    assert "latent 4×6×8" in page.inner_text("#ch-shape")

    page.click("nav .tab[data-tab=interpolate]")
    assert not page.is_visible("#ip-scrub") and not page.is_visible("#ip-view")  # nothing to scrub before a run
    assert page.get_attribute("nav .tab[data-tab=interpolate]", "aria-selected") == "true"
    page.set_input_files("#ip-a", str(a))
    page.set_input_files("#ip-b", str(b))
    page.fill("#ip-steps", "5")
    page.click("#ip-run")
    page.wait_for_function("document.querySelector('#ip-progress .label').textContent.startsWith('5 frames')")
    srcs = page.eval_on_selector_all("#ip-strip img", "els => els.map(e => e.src.slice(0, 22))")
    assert srcs == ["data:image/png;base64,"] * 5
    assert page.eval_on_selector("#ip-progress .bar", "e => e.style.width") == "100%"
    assert page.is_visible("#ip-scrub") and page.get_attribute("#ip-view", "alt") == "Frame 1 of 5"
    page.fill("#ip-slider", "4")
    assert page.get_attribute("#ip-view", "alt") == "Frame 5 of 5"

    page.click("nav .tab[data-tab=compare]")
    page.set_input_files("#cmp-file", str(a))
    page.click("#cmp-run")
    page.wait_for_selector("#cmp-scroll:not([hidden])")
    rows = page.eval_on_selector_all("#cmp-table tbody tr", "trs => trs.map(t => t.cells[0].firstChild.textContent)")
    assert sorted(rows) == ["small-sd1", "small-taesd"]
    assert page.locator("#cmp-table tr.best").count() == 1 and page.locator("#cmp-table .badge").count() == 1
    shots = page.eval_on_selector_all("#cmp-table tbody img", "els => els.map(e => [e.naturalWidth, e.alt])")
    assert sorted(shots) == [[64, "Reconstruction by small-sd1"], [64, "Reconstruction by small-taesd"]]
    seconds = page.eval_on_selector_all("#cmp-table tbody tr", "trs => trs.map(t => Number(t.cells[8].textContent))")
    assert all(0 <= s < 30 for s in seconds)  # the forward passes' time: no queueing, no model loading
    assert not page.is_visible("#error") and not page.is_visible("#cmp-error")


# --- errors, layout and accessibility -----------------------------------------------------------------------------
def in_viewport(page, selector: str) -> bool:  # type: ignore[no-untyped-def]
    """The element is shown and wholly inside the visible part of the page (no scrolling needed)."""
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    return box is not None and 0 <= box["y"] and box["y"] + box["height"] <= size["height"] and box["x"] >= 0


def test_errors_are_visible_plain_per_view_and_clear_stale_results(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(png_bytes(photo(320, 480, seed=24)))  # a tall image: results reach below the fold
    bad.write_bytes(b"this is text, not a picture")
    page.click("nav .tab[data-tab=roundtrip]")
    page.set_input_files("#rt-file", str(good))
    page.click("#rt-run")
    page.wait_for_selector("#rt-metrics:not([hidden])")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # the user scrolled down to the metrics

    page.set_input_files("#rt-file", str(bad))
    page.click("#rt-run")
    page.wait_for_selector("#rt-error:not([hidden])")
    message = page.inner_text("#rt-error")
    assert "Not a supported file" in message and in_viewport(page, "#rt-error")
    for stale in ("#rt-recon", "#rt-diff", "#rt-original", "#rt-metrics"):  # nothing of the earlier run is left
        assert not page.is_visible(stale), stale

    # an internal error is explained, never shown raw (the server's answer is faked here)
    raw = "internal error: RuntimeError: Argument #6: Padding size should be less than the corresponding input"
    page.route("**/roundtrip?*", lambda route: route.fulfill(status=500, body=json.dumps({"error": raw})))
    page.set_input_files("#rt-file", str(good))
    page.click("#rt-run")
    page.wait_for_function("document.querySelector('#rt-error').textContent.includes('internal error')")
    message = page.inner_text("#rt-error")
    assert "RuntimeError" not in message and "Argument" not in message and "log has the details" in message
    page.unroute("**/roundtrip?*")

    # each view keeps its own errors
    page.click("nav .tab[data-tab=channels]")
    assert not page.is_visible("#rt-error") and not page.is_visible("#ch-error") and not page.is_visible("#error")
    page.click("nav .tab[data-tab=roundtrip]")
    assert page.is_visible("#rt-error")

    # the frame count is checked before anything is sent
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/interpolate" in r.url else None)
    page.click("nav .tab[data-tab=interpolate]")
    page.set_input_files("#ip-a", str(good))
    page.set_input_files("#ip-b", str(good))
    for value in ("33", "1", "2.5"):
        page.fill("#ip-steps", value)
        page.click("#ip-run")
        page.wait_for_selector("#ip-error:not([hidden])")
        assert "from 2 to 32" in page.inner_text("#ip-error") and in_viewport(page, "#ip-error")
    assert sent == []
    page.fill("#ip-steps", "8")


def test_phone_width_has_three_equal_columns(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "wide.png"
    image.write_bytes(png_bytes(photo(200, 64, seed=25)))
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.click("nav .tab[data-tab=roundtrip]")
        page.set_input_files("#rt-file", str(image))
        page.click("#rt-run")
        page.wait_for_selector("#rt-metrics:not([hidden])")
        widths = page.eval_on_selector_all("#rt-images figure", "fs => fs.map(f => f.getBoundingClientRect().width)")
        assert len(widths) == 3 and max(widths) - min(widths) < 1, widths
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0  # nothing wider than the screen (wide tables scroll in their own region)
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def axe_source() -> str:
    """axe-core's axe.min.js, as shipped inside the axe-playwright-python package (the test extra installs it)."""
    module = pytest.importorskip("axe_playwright_python", reason="axe-playwright-python (axe-core) is not installed")
    path = Path(module.__file__).parent / "axe.min.js"
    if not path.is_file():
        pytest.skip(f"axe.min.js is not in {path.parent}")
    return path.read_text(encoding="utf-8")


def test_accessibility_has_no_serious_violations(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = axe_source()
    image = tmp_path / "a11y.png"
    image.write_bytes(png_bytes(photo(64, 48, seed=26)))
    found: dict[str, list[str]] = {}
    for tab, file_input, button, ready in (
        ("roundtrip", "#rt-file", "#rt-run", "#rt-metrics:not([hidden])"),
        ("channels", "#ch-file", "#ch-run", "#ch-grid figure"),
        ("compare", "#cmp-file", "#cmp-run", "#cmp-scroll:not([hidden])"),
        ("interpolate", None, None, None),
    ):
        page.click(f"nav .tab[data-tab={tab}]")
        if file_input:
            page.set_input_files(file_input, str(image))
            page.click(button)
            page.wait_for_selector(ready)
        if not page.evaluate("typeof window.axe !== 'undefined'"):
            page.add_script_tag(content=source)
        result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        for v in result["violations"]:
            if v["impact"] in ("serious", "critical"):
                found.setdefault(f"{tab}: {v['id']} ({v['impact']})", []).extend(n["target"][0] for n in v["nodes"])
    assert found == {}, found
