"""The web page in a real browser: headless Debian Chromium driven by Playwright, on the tiny model.

Skips (with the reason) where gradio, playwright or /usr/bin/chromium is missing; never downloads a
browser (apt-get install chromium; pip install playwright, without `playwright install`).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path

import pytest

import demo
from backends import build_backend
from contentv import ui
from contentv.config import BackendConfig, OutputConfig, RunConfig, SamplingConfig, UIConfig

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def missing() -> str | None:
    for module, install in (("gradio", "pip install '.[ui]'"), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(module) is None:
            return f"needs {module} ({install})"
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        return f"needs {CHROMIUM} (apt-get install chromium)"
    return None


if missing():
    pytest.skip(missing(), allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory):
    presets = demo.load_presets()
    model = presets.models["tiny_contentv"]
    cfg = RunConfig(
        model=model,
        backend=BackendConfig(name="cpu"),
        output=OutputConfig(dir=str(tmp_path_factory.mktemp("ui-browser-out"))),
        sampling=SamplingConfig(prompt="a cat", width=48, height=32, num_frames=5, num_inference_steps=2),
        ui=UIConfig(host="127.0.0.1", port=free_port()),
    )
    srv = ui.launch(cfg, presets, build_backend, block=False)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - a browser that can't start here is a skip, not a failure
            pytest.skip(f"chromium does not start here: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)
    page.locator("#prompt textarea").wait_for()
    yield page
    page.close()


def mp4s(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.mp4")}


def expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def test_generate_plays_the_video_in_the_page(server, page):
    out = server.studio.output_dir
    before = mp4s(out)
    page.locator("#prompt textarea").fill("a small boat on a lake")
    page.locator("#generate").click()
    video = page.locator("#video video")
    video.wait_for()
    page.locator("#status .info", has_text="done in").wait_for()
    new = mp4s(out) - before
    assert len(new) == 1 and new.pop().startswith("a-small-boat-on-a-lake_seed42")
    assert (out / "a-small-boat-on-a-lake_seed42.json").is_file()
    # the <video> plays a copy the server really serves
    src = video.get_attribute("src")
    assert src.endswith(".mp4")
    assert page.request.get(src).ok
    expect(page.locator("#info")).to_contain_text("peak memory:")
    link = page.locator("#download a[href$='a-small-boat-on-a-lake_seed42.mp4']")  # the download link
    expect(link).to_have_count(1)
    assert (
        page.request.get(link.get_attribute("href")).body() == (out / "a-small-boat-on-a-lake_seed42.mp4").read_bytes()
    )
    # the queue table (refreshed while jobs are active) shows the job done, with a link that serves its video
    row = page.locator("#jobs tr", has_text="a small boat on a lake")
    expect(row).to_contain_text("done")
    href = row.locator("a").evaluate("a => a.href")  # as the browser resolves it
    assert page.request.get(href).body() == (out / "a-small-boat-on-a-lake_seed42.mp4").read_bytes()


def test_bad_frames_shows_the_command_lines_error_and_runs_nothing(server, page):
    out = server.studio.output_dir
    before = mp4s(out)
    page.locator("#frames input").fill("10")
    page.locator("#generate").click()
    error = page.locator("#status .error")
    error.wait_for()
    expect(error).to_have_text("error: sampling.num_frames=10 is not valid: of the form 4k+1, e.g. 49, 121, 125")
    page.wait_for_timeout(500)  # the queued half returns at once without running
    assert mp4s(out) == before


def test_opening_the_memory_options_keeps_generate_working(server, page):
    # gradio's number box sends 0 once shown: an empty budget must stay "none" (a text box), not 0 GB
    out = server.studio.output_dir
    before = mp4s(out)
    page.get_by_text("Memory", exact=True).first.click()
    page.locator("#budget_gb textarea, #budget_gb input").first.wait_for()
    page.locator("#prompt textarea").fill("a green kite")
    page.locator("#generate").click()
    page.locator("#status .info", has_text="done in").wait_for()
    assert {p for p in mp4s(out) - before} == {"a-green-kite_seed42.mp4"}
