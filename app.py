"""A local web page for colorizing greyscale face photos with a Color Diffusion checkpoint.

    python app.py                                  # http://127.0.0.1:7860, checkpoints/celeba64.pt
    python app.py --checkpoint runs/celeba64/ckpt.pt --port 8000
    python app.py --host 0.0.0.0                   # reachable from other machines (only when asked)
    python app.py --share                          # a temporary public gradio.live link (needs internet)

Upload, drop or paste a photo (or click an example face), press Colorize. Requests are queued, so several
users can share one model; the model is loaded once, at start.
"""
import argparse
import os
import random
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check: works offline

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from inference import DEFAULT_CHECKPOINT, DEFAULT_STEPS, colorize  # noqa: E402
from model import CheckpointError, load_model  # noqa: E402
from utils import ImageError, bf16_is_fast, load_image, pick_device  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.join(HERE, "examples")
MAX_FILE_SIZE = "50mb"        # larger uploads are refused by the page itself
MAX_PIXELS = 40_000_000       # 40 megapixels: larger images are refused before they are decoded
MAX_SAMPLES = 8


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


def example_faces() -> list[str]:
    """The bundled example photos; none (and no examples row) if the folder is missing or empty."""
    if not os.path.isdir(EXAMPLES_DIR):
        return []
    return [os.path.join(EXAMPLES_DIR, f) for f in sorted(os.listdir(EXAMPLES_DIR))
            if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))]


def build_demo(model, amp=False) -> gr.Blocks:
    T = model.config.timesteps

    def run(photo, steps, start, guidance, num_samples, seed, random_seed, dynamic_thresholding,
            progress=gr.Progress()):
        img = open_upload(photo)
        seed = random.randrange(2 ** 31) if random_seed or seed is None else int(seed)
        progress(0, desc="Denoising")

        def callback(i, n, x_t, x0):
            progress((i + 1, n), desc="Denoising")

        samples = colorize(model, img, steps=int(steps), num_samples=int(num_samples), seed=seed,
                           dynamic_thresholding=bool(dynamic_thresholding), min_signal=float(start),
                           guidance=float(guidance), callback=callback, amp=amp)
        return (img, samples[0]), samples, seed

    def check(photo):
        """On upload: a bad file is reported at once (and removed), not only when Colorize is pressed."""
        try:
            open_upload(photo)
            return gr.skip()
        except gr.Error as e:
            gr.Warning(e.message, title="Cannot use this file")
            return None

    with gr.Blocks(title="Color Diffusion", analytics_enabled=False) as demo:
        gr.Markdown("# Color Diffusion\nColorize a greyscale face photo: upload, drop or paste one "
                    "(or click an example), then press **Colorize**. Each sample is a different guess.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Greyscale photo", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], height=360, elem_id="photo")
                if example_faces():
                    gr.Examples([[path] for path in example_faces()], inputs=[photo], label="Example faces",
                                cache_examples=False, elem_id="examples")
                with gr.Accordion("Settings", open=True):
                    steps = gr.Slider(1, T, value=min(DEFAULT_STEPS, T), step=1, label="Sampling steps",
                                      info=f"more: slower, often cleaner; {T}: the full DDPM loop")
                    start = gr.Slider(0, 0.2, value=model.config.sample_min_signal, step=0.005,
                                      label="Sampling start (signal level)",
                                      info="lower: bolder colours, more mistakes")
                    # only a model trained with cond_drop has the unconditional colours that guidance needs
                    guidance = gr.Slider(0, 3, value=model.config.guidance, step=0.05, label="Guidance",
                                         info="higher: bolder colours; 1: none", visible=model.config.cond_drop > 0)
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
                comparison = gr.ImageSlider(label="Before / after (drag the slider)", format="png",
                                            interactive=False, max_height=600, elem_id="comparison")
                gallery = gr.Gallery(label="Samples (full size, each downloadable)", format="png", columns=4,
                                     interactive=False, height="fit-content", object_fit="contain",
                                     elem_id="samples")

        # preprocess=False: run() gets the raw uploaded file, so a broken file gets a clear message, not
        # Gradio's own decoding error. (Gradio still checks that the path is one of its uploads.)
        photo.upload(check, photo, photo, preprocess=False)
        button.click(run, [photo, steps, start, guidance, num_samples, seed, random_seed, dynamic_thresholding],
                     [comparison, gallery, seed], preprocess=False)
    return demo


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="default: %(default)s")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s: this machine only; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args()

    try:
        device = pick_device(args.device)
        model = load_model(args.checkpoint, device)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    except (RuntimeError, KeyError, TypeError) as e:
        sys.exit(f"error: {args.checkpoint}: its weights do not fit the model ({type(e).__name__})")

    demo = build_demo(model, amp=bf16_is_fast(device))
    demo.queue()
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_FILE_SIZE)
    except OSError as e:  # e.g. the port is taken
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
