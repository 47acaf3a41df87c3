"""Drive the web UI (app.py) in headless Chromium: the helpers of tests/test_app.py, and the README screenshot.

    python tests/browser.py                         # visualization/app.png from the default checkpoint
    python tests/browser.py --checkpoint runs/whole/ckpt.pt --samples 4

The screenshot: app.py on a free local port, the first example face clicked, Colorize pressed, the result
awaited, a full-page screenshot saved. Needs Playwright (pip) and
Debian's /usr/bin/chromium; no browser download.
"""
import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(checkpoint, timeout=180, log_path=None):
    """Start `python app.py --checkpoint ... --port <free>`; yield its URL once it answers; stop it after."""
    port = free_port()
    log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="app_log_"), "app.log")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--checkpoint", str(checkpoint),
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{open(log_path).read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not listen within {timeout}s:\n{open(log_path).read()}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_app(browser, url, viewport=(1280, 900)):
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.goto(url)
    page.get_by_role("button", name="Colorize").wait_for()
    return page


def sample_urls(page) -> list[str]:
    return [img.get_attribute("src") for img in page.locator("#samples img").all()]


def colorize_and_wait(page, timeout=120_000) -> list[str]:
    """Press Colorize and wait until the gallery shows a new result; returns the sample image URLs."""
    before = sample_urls(page)
    page.get_by_role("button", name="Colorize").click()
    return wait_for_new_samples(page, before, timeout)


def wait_for_new_samples(page, before, timeout=120_000) -> list[str]:
    """Wait until the gallery's image URLs differ from `before` (each result is a new file)."""
    page.wait_for_function("old => { const now = [...document.querySelectorAll('#samples img')]"
                           ".map(i => i.getAttribute('src'));"
                           " return now.length > 0 && now.join() !== old.join(); }",
                           arg=before, timeout=timeout)
    page.wait_for_function("() => [...document.querySelectorAll('#samples img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=timeout)
    return sample_urls(page)


def upload(page, path):
    """Choose a photo in the photo input's file dialog; wait until the page shows it, and its hints view (new
    pictures, where another photo was shown before)."""
    shown = "() => ['#photo img', '#hint-view img'].map(s => document.querySelector(s)?.getAttribute('src'))"
    before = page.evaluate(shown)
    page.set_input_files("#photo input[type=file]", path)
    page.wait_for_function(f"old => ({shown})().every((src, i) => src && src !== old[i])", arg=before,
                           timeout=120_000)


def timed_colorize(page, timeout=600) -> float:
    """Press Colorize; the seconds, timed in the page, until every result picture (the before/after view and the
    gallery) is new and decoded: what a user waits for, the photo being uploaded already."""
    return page.evaluate("""timeout => new Promise((resolve, reject) => {
        // checked on every change to the page and every picture loaded, not polled: a poll would take CPU from
        // the server on the same machine
        const shown = () => [...document.querySelectorAll('#comparison img, #samples img')];
        const before = shown().map(i => i.getAttribute('src')).join();
        const check = () => {
            const now = shown();
            if (now.length && now.map(i => i.getAttribute('src')).join() !== before &&
                now.every(i => i.complete && i.naturalWidth > 0)) {
                observer.disconnect();
                document.removeEventListener('load', check, true);
                resolve((performance.now() - t0) / 1000);
            }
        };
        const observer = new MutationObserver(check);
        observer.observe(document.body, {subtree: true, childList: true, attributes: true});
        document.addEventListener('load', check, true);
        setTimeout(() => reject(new Error('no result within ' + timeout + ' s')), timeout * 1000);
        const t0 = performance.now();
        [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Colorize').click();
    })""", timeout)


def set_samples(page, n):
    box = page.locator("#samples-count input[type=number]")
    box.fill(str(n))
    box.press("Enter")


def add_hint(page, fx, fy):
    """Click the hints view at a fraction (fx, fy) of its picture; wait until the view shows the new dot."""
    view = page.locator("#hint-view img").first
    view.wait_for()
    before = view.get_attribute("src")
    box = view.bounding_box()
    view.click(position={"x": fx * box["width"], "y": fy * box["height"]})
    page.wait_for_function("old => { const i = document.querySelector('#hint-view img');"
                           " return i && i.getAttribute('src') !== old; }", arg=before, timeout=30_000)


def take_screenshot(url, out, samples=4, example=0):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_app(browser, url)
        page.locator("#examples img").nth(example).click()
        page.locator("#photo img").first.wait_for()
        set_samples(page, samples)
        colorize_and_wait(page, timeout=600_000)
        page.screenshot(path=out, full_page=True)
        browser.close()


def main():
    sys.path.insert(0, ROOT)
    from inference import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="default: %(default)s")
    p.add_argument("--out", default=os.path.join(ROOT, "visualization", "app.png"), help="default: %(default)s")
    p.add_argument("--samples", type=int, default=4, help="number of samples to show (default: %(default)s)")
    p.add_argument("--example", type=int, default=0, help="which example face to click (default: the first)")
    args = p.parse_args()
    with running_app(args.checkpoint) as url:
        take_screenshot(url, args.out, args.samples, args.example)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
