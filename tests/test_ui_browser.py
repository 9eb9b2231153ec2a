"""The web UI in headless Chromium (Playwright driving the system's chromium): pick a VAE, upload an image, see the
reconstruction and its metrics; the latent channels, interpolation and comparison views; a screenshot is saved."""

from __future__ import annotations

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
    page.set_input_files("#ip-a", str(a))
    page.set_input_files("#ip-b", str(b))
    page.fill("#ip-steps", "5")
    page.click("#ip-run")
    page.wait_for_function("document.querySelector('#ip-progress .label').textContent.startsWith('5 frames')")
    srcs = page.eval_on_selector_all("#ip-strip img", "els => els.map(e => e.src.slice(0, 22))")
    assert srcs == ["data:image/png;base64,"] * 5
    assert page.eval_on_selector("#ip-progress .bar", "e => e.style.width") == "100%"

    page.click("nav .tab[data-tab=compare]")
    page.set_input_files("#cmp-file", str(a))
    page.click("#cmp-run")
    page.wait_for_selector("#cmp-table:not([hidden])")
    rows = page.eval_on_selector_all("#cmp-table tbody tr", "trs => trs.map(t => t.cells[0].textContent)")
    assert sorted(rows) == ["small-sd1", "small-taesd"]
    assert page.locator("#cmp-table tr.best").count() == 1
    assert not page.is_visible("#error")
