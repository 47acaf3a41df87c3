"""A local web page for colorizing greyscale photos (faces, and the world around them) with Color Diffusion.

    python app.py                                  # http://127.0.0.1:7860, checkpoints/photos64_distilled.pt
    python app.py --checkpoint checkpoints/photos64.pt --port 8000  # its teacher: 8 passes, guidance sliders
    python app.py --host 0.0.0.0                   # reachable from other machines (only when asked)
    python app.py --share                          # a temporary public gradio.live link (needs internet)

Upload, drop or paste a photo (or click an example), press Colorize. To steer the colours, pick a
colour and click on the photo under "Colour hints": each click pins that colour there, and the region around
it follows. Requests are queued, so several users can share one model; the model is loaded once, at start.
"""
import math
import os
import random
import signal
import sys
import tempfile
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check: works offline

import gradio as gr  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from inference import DEFAULT_CHECKPOINT, colorize, load_hints, sample_paths, save_result  # noqa: E402
from model import SAMPLERS, CheckpointError, load_model, range_check  # noqa: E402
from runtime import fast_runtime  # noqa: E402
from utils import IMAGE_EXTENSIONS, ArgumentParser, ImageError, load_image, pick_device  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.join(HERE, "examples")
MAX_FILE_SIZE = "50mb"        # larger uploads are refused by the page itself
MAX_PIXELS = 40_000_000       # 40 megapixels: larger images are refused before they are decoded
MAX_SAMPLES = 8
START_RANGE, GUIDANCE_RANGE = (0, 0.2), (0, 3)  # the sliders', and what the page's endpoint accepts
VIEW_SIZE = 1024              # the hints view's long side, at least (see show_hints)
PREVIEW_SIZE = 1024           # the before/after slider's long side, at most (see preview)
BROWSER_FORMATS = (".jpg", ".jpeg", ".png", ".webp")  # a result keeps its upload's format if it is one of these


def open_upload(photo) -> Image.Image:
    """The uploaded file (Gradio's file dict, unprocessed) as a PIL image, or gr.Error with a reason
    for the page (a user's mistake, not a server error: no traceback in the console)."""
    if not photo or not photo.get("path"):
        raise gr.Error("Upload a photo (or click an example) first.", print_exception=False)
    path, name = photo["path"], photo.get("orig_name") or "the file"
    try:
        with Image.open(path) as im:  # reads only the header: the size, before anything is decoded
            too_large = im.width * im.height > MAX_PIXELS
    except Image.DecompressionBombError:
        too_large = True
    except Exception:
        too_large = False  # not an image at all: load_image says why below
    if too_large:
        raise gr.Error(f"{name} is too large: at most {MAX_PIXELS // 1_000_000} megapixels, please.",
                       print_exception=False)
    try:
        return load_image(path)
    except ImageError as e:
        raise gr.Error(f"Cannot use {str(e).replace(path, name)}. Please upload a photo (JPEG, PNG, WebP...).",
                       print_exception=False)


def example_photos() -> list[str]:
    """The bundled example photos; none (and no examples row) if the folder is missing or empty."""
    if not os.path.isdir(EXAMPLES_DIR):
        return []
    return [os.path.join(EXAMPLES_DIR, f) for f in sorted(os.listdir(EXAMPLES_DIR))
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]


def view_zoom(img: Image.Image) -> float:
    """How much the hints view enlarges a photo: to VIEW_SIZE on its long side, never shrunk."""
    return max(1.0, VIEW_SIZE / max(img.size))


def hint_radius(img: Image.Image) -> int:
    """A click's hint: a dot about a 40th of the photo's short side (a few model pixels)."""
    return max(2, min(img.size) // 40)


def hint_image(img: Image.Image, hints) -> Image.Image:
    """The hints [(x, y, colour)] as an RGBA image the photo's size: opaque dots, transparent elsewhere."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw, r = ImageDraw.Draw(layer), hint_radius(img)
    for x, y, colour in hints:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return layer


def preview(img: Image.Image) -> Image.Image:
    """A copy at most PREVIEW_SIZE on its long side, to look at: the page encodes what it shows as PNG, 2 s for a
    10-megapixel photo, while the gallery's files keep the full size."""
    if max(img.size) <= PREVIEW_SIZE:
        return img
    small = img.copy()
    small.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE), Image.BICUBIC)
    return small


def save_samples(samples, name, source) -> list[str]:
    """The samples as the files a download gets: named after the upload (photo_color.jpg, or photo_color_0.jpg,
    photo_color_1.jpg, ...), in its format where a browser shows it and PNG otherwise (and for transparency),
    written as the command writes them; in Gradio's cache, which serves them as they are."""
    stem, ext = os.path.splitext(os.path.basename(name))
    if ext.lower() not in BROWSER_FORMATS or (samples[0].mode == "RGBA" and ext.lower() in (".jpg", ".jpeg")):
        ext = ".png"
    cache = gr.utils.get_upload_folder()
    os.makedirs(cache, exist_ok=True)
    folder = tempfile.mkdtemp(dir=cache)
    paths = sample_paths(os.path.join(folder, f"{stem}_color{ext}"), len(samples))
    for sample, path in zip(samples, paths):
        save_result(sample, path, source)
    return paths


def setting(value, name, low, high):
    """A number from the page: its sliders bound it, but not a client calling the endpoint directly
    (gradio_client, curl), which could send NaN, 5.0 or 100000 steps. Out of range is the page's error."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    ok, message = range_check(value, name, low, high)
    if not ok:
        raise gr.Error(message, print_exception=False)
    return value


def parse_colour(colour) -> str:
    """Gradio's colour picker gives '#rrggbb' or 'rgba(r, g, b, a)': PIL wants the former."""
    if colour.startswith("rgb"):
        r, g, b = (round(float(v)) for v in colour[colour.index("(") + 1:-1].split(",")[:3])
        return f"#{r:02x}{g:02x}{b:02x}"
    return colour


def build_demo(model, runtime=None) -> gr.Blocks:
    c, T = model.config, model.config.timesteps
    # only a model trained with cond_drop has the unconditional colours that guidance needs, and a progressive
    # student learned one scale, its teacher's
    guided = c.cond_drop > 0 and not c.distil_steps

    def run(photo, hints, sampler, steps, start, guidance, guidance_first, num_samples, seed, random_seed,
            dynamic_thresholding, progress=gr.Progress()):
        if sampler not in SAMPLERS:
            raise gr.Error(f"Sampler must be one of {', '.join(SAMPLERS)}.", print_exception=False)
        steps, num_samples = (int(setting(v, name, 1, high)) for v, name, high in
                              ((steps, "Sampling steps", T), (num_samples, "Number of samples", MAX_SAMPLES)))
        start = setting(start, "Sampling start", *START_RANGE)
        if guided:
            guidance, guidance_first = (setting(v, name, *GUIDANCE_RANGE) for v, name in
                                        ((guidance, "Guidance"), (guidance_first, "Guidance at the first step")))
        else:  # the sliders are hidden: the checkpoint's own scale (a student's may lie above their range),
            guidance = guidance_first = None  # whatever a client sends
        img = open_upload(photo)
        if random_seed or seed is None:
            seed = random.randrange(2 ** 31)
        seed = int(setting(seed, "Seed", 0, 2 ** 32 - 1))
        progress(0, desc="Denoising")

        def callback(i, n, x_t, x0):
            progress((i + 1, n), desc="Denoising")

        samples = colorize(model, img, sampler=sampler, steps=steps, num_samples=num_samples, seed=seed,
                           dynamic_thresholding=bool(dynamic_thresholding), min_signal=start,
                           guidance=guidance, guidance_first=guidance_first, callback=callback,
                           runtime=runtime,
                           hints=load_hints(hint_image(img, hints), img.size) if hints else None)
        files = save_samples(samples, photo.get("orig_name") or photo["path"], img)
        return (preview(img), preview(samples[0])), files, seed

    def check(photo):
        """On upload: a bad file is reported at once (and removed), not only when Colorize is pressed."""
        try:
            open_upload(photo)
            return gr.skip()
        except gr.Error as e:
            gr.Warning(e.message, title="Cannot use this file")
            return None

    def show_hints(photo, hints):
        """The photo with its hints, at least VIEW_SIZE pixels long: Gradio maps a click to the picture's pixels
        correctly only where the page shows it at its own size or smaller."""
        if not photo or not photo.get("path"):
            return None
        img = open_upload(photo).convert("RGB")
        layer = hint_image(img, hints)
        img.paste(layer, (0, 0), layer)
        zoom = view_zoom(img)
        return img.resize((round(img.width * zoom), round(img.height * zoom)), Image.NEAREST) if zoom > 1 else img

    def add_hint(photo, hints, colour, evt: gr.SelectData):
        """A click on the hints view pins the picked colour at that pixel of the photo."""
        if not photo or not photo.get("path"):
            raise gr.Error("Upload a photo (or click an example) first.", print_exception=False)
        zoom = view_zoom(open_upload(photo))
        hints = hints + [(round(evt.index[0] / zoom), round(evt.index[1] / zoom), parse_colour(colour))]
        return show_hints(photo, hints), hints

    # every upload and result lies in Gradio's temporary folder: files older than a day go each hour, the rest
    # when the page stops
    with gr.Blocks(title="Color Diffusion", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# Color Diffusion\nColorize a greyscale photo: upload, drop or paste one "
                    "(or click an example), then press **Colorize**. Each sample is a different guess.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Greyscale photo", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], height=360, elem_id="photo")
                if example_photos():
                    gr.Examples([[path] for path in example_photos()], inputs=[photo], label="Examples",
                                cache_examples=False, elem_id="examples")
                hints = gr.State([])
                with gr.Accordion("Colour hints", open=True):
                    gr.Markdown("Pick a colour, then click on the photo below: that spot takes the colour, and "
                                "the model colours its surroundings to suit.")
                    with gr.Row():
                        colour = gr.ColorPicker(value="#3060c0", label="Hint colour", elem_id="hint-colour")
                        clear = gr.Button("Clear hints", elem_id="clear-hints")
                    hint_view = gr.Image(label="Click to add a hint", type="pil", interactive=False, format="png",
                                         height=360, elem_id="hint-view")
                with gr.Accordion("Settings", open=True):
                    sampler = gr.Dropdown(list(SAMPLERS), value=c.sampler, label="Sampler",
                                          info="ddpm: the original's full loop (slow)")
                    steps = gr.Slider(1, T, value=min(c.sample_steps, T), step=1, label="Sampling steps",
                                      info="more: slower, and bolder where every step is guided "
                                           "(ddpm runs every timestep)")
                    start = gr.Slider(*START_RANGE, value=model.config.sample_min_signal, step=0.005,
                                      label="Sampling start (signal level)",
                                      info="lower: bolder colours, more mistakes")
                    guidance = gr.Slider(*GUIDANCE_RANGE, value=c.guidance, step=0.05, label="Guidance",
                                         info="at the steps after the first: higher, bolder colours; 1: none",
                                         visible=guided)
                    guidance_first = gr.Slider(*GUIDANCE_RANGE, value=c.guidance_first or c.guidance, step=0.05,
                                               label="Guidance at the first step", visible=guided,
                                               info="where the colours are chosen: lower than Guidance keeps "
                                                    "faces from outshining the rest; 0: as Guidance")
                    num_samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="Number of samples",
                                            elem_id="samples-count")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                        random_seed = gr.Checkbox(value=True, label="Random seed",
                                                  info="untick to repeat a result: its seed is shown")
                    dynamic_thresholding = gr.Checkbox(value=False, label="Dynamic thresholding",
                                                       info="tames over-saturated colours")
                button = gr.Button("Colorize", variant="primary")
            with gr.Column():
                # no download button: it would give the preview (see preview); the gallery's give the whole photo
                comparison = gr.ImageSlider(label="Before / after (drag the slider)", format="png",
                                            interactive=False, max_height=600, elem_id="comparison",
                                            buttons=["fullscreen"])
                gallery = gr.Gallery(label="Samples (full size, each downloadable)", columns=4,
                                     interactive=False, height="fit-content", object_fit="contain",
                                     elem_id="samples")

        # preprocess=False: run() gets the raw uploaded file, so a broken file gets a clear message, not
        # Gradio's own decoding error. (Gradio still checks that the path is one of its uploads.)
        photo.upload(check, photo, photo, preprocess=False)
        # a new photo (uploaded, pasted, an example) starts with no hints
        photo.change(lambda photo: (show_hints(photo, []), []), photo, [hint_view, hints], preprocess=False)
        hint_view.select(add_hint, [photo, hints, colour], [hint_view, hints], preprocess=False)
        clear.click(lambda photo: (show_hints(photo, []), []), photo, [hint_view, hints], preprocess=False)
        button.click(run, [photo, hints, sampler, steps, start, guidance, guidance_first, num_samples, seed,
                           random_seed, dynamic_thresholding], [comparison, gallery, seed], preprocess=False)
    return demo


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="default: %(default)s")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s: this machine only; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--runtime", choices=("auto", "openvino", "torch"), default="auto",
                   help="auto: OpenVINO on a CPU, PyTorch on a GPU")
    args = p.parse_args()

    try:
        device = pick_device(args.device)
        model = load_model(args.checkpoint, device)
        runtime = fast_runtime(model, args.runtime)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

    demo = build_demo(model, runtime=runtime)
    demo.queue()
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_FILE_SIZE,
                    prevent_thread_lock=True)
    except OSError as e:  # e.g. the port is taken
        sys.exit(f"error: {e}")
    # stopped by Ctrl-C or a service manager's SIGTERM, the page closes in full, which removes its files (Gradio's
    # own wait closes only the server, and leaves them)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while demo.is_running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        demo.close()


if __name__ == "__main__":
    main()
