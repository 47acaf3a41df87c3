"""The web UI (app.py) driven in a real headless Chromium, against a tiny random-init checkpoint.

A random model paints random colours, so the checks are about the plumbing: a result comes back, in colour,
at the input's exact size; bad files give a clear message in the page and the server keeps serving; two
users at once both get their results; a bad checkpoint is a one-line error. The browser tests need
Debian's /usr/bin/chromium (skipped without it); Playwright drives it, no browser download.
Re-take the README screenshot with: python tests/browser.py
"""
import base64
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from browser import (CHROMIUM, add_hint, colorize_and_wait, launch_chromium, open_app, running_app,  # noqa: E402
                     sample_urls, set_samples, wait_for_new_samples)
from conftest import open_image  # noqa: E402
from app import GUIDANCE_RANGE, PREVIEW_SIZE, example_photos  # noqa: E402
from inference import DEFAULT_CHECKPOINT  # noqa: E402
from model import load_checkpoint  # noqa: E402

W, H = 120, 90  # not square: the result must keep the input's exact size


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("app")
    # trained for guidance and hints, and guided by default: the page's default path is the guided sampler
    shutil.copy(tiny_checkpoint(cond_drop=0.1, guidance=1.5, hints=True), d / "tiny.pt")
    y, x = np.mgrid[0:H, 0:W]
    grey = (x * 2 + y) * 255 // (2 * W + H)
    Image.fromarray(grey.astype(np.uint8), "L").save(d / "grey.png")
    (d / "not_an_image.png").write_bytes(b"this is text, not a PNG\n" * 20)
    Image.new("L", (7000, 6000), 128).save(d / "huge.png")       # 42 megapixels, a small file
    with open(d / "big.png", "wb") as f:                          # over the 50 MB upload limit
        f.truncate(51 * 1024 * 1024)
    return d


@pytest.fixture(scope="module")
def url(files):
    with running_app(files / "tiny.pt", log_path=files / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser(url):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt install chromium): the browser tests need it")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    page = open_app(browser, url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
    yield page
    page.close()


def fetch_image(page, src) -> Image.Image:
    response = page.request.get(src)
    assert response.ok, src
    return Image.open(io.BytesIO(response.body()))


def chroma(img: Image.Image) -> float:
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def check_result(page, srcs, n=1):
    assert len(srcs) == n
    for src in srcs:
        img = fetch_image(page, src)
        assert img.size == (W, H)
        assert chroma(img) > 1.0, "the result is grey"
    before, after = [fetch_image(page, i.get_attribute("src")) for i in page.locator("#comparison img").all()]
    assert before.size == after.size == (W, H)
    assert np.array_equal(np.asarray(after), np.asarray(fetch_image(page, srcs[0])))


def expect_message(page, text):
    """A toast (gr.Error / gr.Warning / Gradio's own) with `text` shows up in the page."""
    page.locator(".toast-body", has_text=text).first.wait_for(timeout=30_000)


def drop_file(page, path):
    """Drag-and-drop a file onto the photo input, as a user dropping it from the desktop."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    transfer = page.evaluate_handle("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/png'})); return dt; }""",
                                    [data, os.path.basename(path)])
    target = page.locator("#photo button.upload-container")
    for event in ("dragenter", "dragover", "drop"):
        target.dispatch_event(event, {"dataTransfer": transfer})
    page.locator("#photo img").first.wait_for()


def paste_file(page, path):
    """Put an image on the clipboard and press the input's "Paste from clipboard" button."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    page.evaluate("""async b64 => {
        const blob = new Blob([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], {type: 'image/png'});
        await navigator.clipboard.write([new ClipboardItem({'image/png': blob})]); }""", data)
    page.get_by_role("button", name="Paste from clipboard").click()
    page.locator("#photo img").first.wait_for()


def test_dropped_photo_is_colorized_at_full_size(page, files):
    outside = []
    local = ("http://127.0.0.1", "data:", "blob:")
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    page.reload()
    drop_file(page, files / "grey.png")
    seed = page.get_by_label("Seed", exact=True)
    old_seed = seed.input_value()
    check_result(page, colorize_and_wait(page))
    assert seed.input_value() != old_seed, "the random seed used is shown"
    assert outside == [], "the page must not reach the network"


def test_bad_files_give_a_clear_message_and_the_server_keeps_serving(page, files):
    page.get_by_role("button", name="Colorize").click()
    expect_message(page, "Upload a photo (or click an example) first.")
    chooser = page.locator("#photo input[type=file]")
    chooser.set_input_files(files / "not_an_image.png")
    expect_message(page, "Cannot use not_an_image.png: not an image file.")
    chooser.set_input_files(files / "huge.png")
    expect_message(page, "huge.png is too large: at most 40 megapixels")
    chooser.set_input_files(files / "big.png")
    expect_message(page, "exceed the maximum allowed size of 50.0 Mb")
    assert page.locator("#photo img").count() == 0, "a rejected file stays out of the input"
    paste_file(page, files / "grey.png")
    check_result(page, colorize_and_wait(page))
    assert "Traceback" not in (files / "app.log").read_text(), "a user's bad file is no server error"


def test_two_users_at_once_both_get_their_results(browser, url, files):
    first, second = open_app(browser, url), open_app(browser, url)
    first.locator("#examples img").first.click()
    first.locator("#photo img").first.wait_for()
    drop_file(second, files / "grey.png")
    set_samples(second, 3)
    old = sample_urls(first)
    first.get_by_role("button", name="Colorize").click()  # both requests are queued: one runs after the other
    check_result(second, colorize_and_wait(second), n=3)
    result = fetch_image(first, wait_for_new_samples(first, old)[0])
    example = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".jpg"))[0]
    assert result.size == open_image(os.path.join(ROOT, "examples", example)).size
    assert chroma(result) > 1.0


def test_the_endpoint_refuses_what_the_sliders_would_not_send(url, files):
    """A client calling /run directly (gradio_client, curl) is bounded as the page's sliders are: NaN, 500
    samples, 100000 steps or a start of 5.0 are an error in a second, not a server held for minutes. (JSON has
    no NaN: such a client sends it as text.)"""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    client = Client(url, verbose=False)
    photo = handle_file(str(files / "grey.png"))
    ok = dict(sampler="ddim", steps=2, start=0.04, guidance=1.5, guidance_first=0, num_samples=1, seed=0,
              random_seed=False, dynamic_thresholding=False)
    names = list(ok)
    for bad, message in ((dict(num_samples=500), "Number of samples"), (dict(steps=100000), "Sampling steps"),
                         (dict(start=5.0), "Sampling start"), (dict(guidance="nan"), "Guidance"),
                         (dict(guidance_first="inf"), "Guidance at the first step"), (dict(guidance=-1), "Guidance"),
                         (dict(sampler="nonsense"), "Sampler")):
        with pytest.raises(AppError, match=message):
            client.predict(photo, *[{**ok, **bad}[k] for k in names], api_name="/run")
    comparison, samples, seed = client.predict(photo, *ok.values(), api_name="/run")
    assert len(samples) == 1 and seed == 0


def test_a_big_photo_is_shown_small_and_downloaded_whole_in_its_own_format(url, files):
    """The before/after slider shows a copy at most PREVIEW_SIZE long (a 10-megapixel PNG took the page 2 s to
    encode); the gallery's file is the whole photo, named after the upload, in its format (JPEG in, JPEG out)."""
    from gradio_client import Client, handle_file
    y, x = np.mgrid[0:1000, 0:1500]
    Image.fromarray(((x + y) * 255 // 2500).astype(np.uint8), "L").save(files / "scan.jpg", quality=90)
    comparison, samples, _ = Client(url, verbose=False).predict(
        handle_file(str(files / "scan.jpg")), sampler="ddim", steps=2, start=0.04, guidance=1.5, guidance_first=0,
        num_samples=2, seed=0, random_seed=False, dynamic_thresholding=False, api_name="/run")
    assert [open_image(p).size for p in comparison] == [(PREVIEW_SIZE, round(PREVIEW_SIZE * 2 / 3))] * 2
    names = [os.path.basename(s["image"]) for s in samples]
    assert names == ["scan_color_0.jpg", "scan_color_1.jpg"]
    for s in samples:
        out = open_image(s["image"])
        assert out.format == "JPEG" and out.size == (1500, 1000) and chroma(out) > 1.0


def test_the_default_students_page_takes_what_its_own_sliders_send(files):
    """The shipped default is a distilled student: its guidance sliders are hidden and hold its own scale,
    which lies above their range; a request with them is colorized, not refused."""
    from gradio_client import Client, handle_file
    c = load_checkpoint(DEFAULT_CHECKPOINT)["config"]
    assert c["distil_steps"] and c["guidance"] > GUIDANCE_RANGE[1]
    with running_app(DEFAULT_CHECKPOINT) as url:
        comparison, samples, seed = Client(url, verbose=False).predict(
            handle_file(str(files / "grey.png")), sampler=c["sampler"], steps=c["sample_steps"],
            start=c["sample_min_signal"], guidance=c["guidance"], guidance_first=c["guidance_first"], num_samples=1,
            seed=0, random_seed=False, dynamic_thresholding=False, api_name="/run")
    assert len(samples) == 1 and seed == 0


def test_the_page_removes_its_uploads_and_results_when_it_stops(files, tmp_path, monkeypatch):
    """Every upload and result lies in Gradio's temporary folder: a page stopped as a service manager stops it
    (SIGTERM) leaves none of them behind."""
    from gradio_client import Client, handle_file
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # running_app passes the environment on

    def kept():
        return sorted(f for _, _, names in os.walk(tmp_path) for f in names)
    with running_app(files / "tiny.pt") as url:
        Client(url, verbose=False, download_files=False).predict(
            handle_file(str(files / "grey.png")), sampler="ddim", steps=2, start=0.04, guidance=1.5,
            guidance_first=0, num_samples=1, seed=0, random_seed=False, dynamic_thresholding=False, api_name="/run")
        assert {"grey.png", "grey_color.png"} <= set(kept())
    assert kept() == sorted(os.path.basename(p) for p in example_photos())  # the page's examples stay


@pytest.mark.parametrize("checkpoint", ["missing.pt", "not_an_image.png"])
def test_bad_checkpoint_is_a_one_line_error(files, checkpoint):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--checkpoint", str(files / checkpoint)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_clicked_hint_colours_its_spot_and_clear_removes_it(page, files):
    drop_file(page, files / "grey.png")
    add_hint(page, 0.3, 0.5)
    view = np.asarray(fetch_image(page, page.locator("#hint-view img").first.get_attribute("src")).convert("RGB"))
    zoom = view.shape[1] / W  # the view enlarges small photos (see app.show_hints)
    assert view.shape[0] == round(H * zoom)
    blue = np.argwhere((view[..., 2].astype(int) - view[..., 0]) > 80)  # the default hint colour, #3060c0
    assert len(blue), "the hint shows as a dot on the photo"
    y, x = (blue.mean(axis=0) / zoom).round().astype(int)
    assert abs(x - 0.3 * W) < 0.1 * W and abs(y - 0.5 * H) < 0.1 * H
    result = np.asarray(fetch_image(page, colorize_and_wait(page)[0]).convert("RGB")).astype(int)
    r, g, b = result[y, x]
    assert b - r > 40 and b > g, result[y, x]  # blue at the hinted spot, at the photo's lightness
    before = page.locator("#hint-view img").first.get_attribute("src")
    page.get_by_role("button", name="Clear hints").click()
    page.wait_for_function("old => document.querySelector('#hint-view img').getAttribute('src') !== old",
                           arg=before, timeout=30_000)
    view = np.asarray(fetch_image(page, page.locator("#hint-view img").first.get_attribute("src")).convert("RGB"))
    assert not ((view[..., 2].astype(int) - view[..., 0]) > 80).any(), "the hint is gone"
