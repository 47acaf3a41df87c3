"""How fast is colorization on this machine? Prints markdown tables, all measured in this one run.

    python benchmark.py                  # a few minutes on 2 CPU cores
    python benchmark.py --quick          # fewer repeats, no torch.compile
    python benchmark.py --device cuda

1. One denoising step of the shipped UNet at the model resolution of a 178x218 photo, per runtime: PyTorch
   float32, PyTorch bf16 autocast, torch.compile, OpenVINO (CPU only); batch 1, 2 (a guided pair) and 16.
2. Seconds per photo, and the ratio to the original project's loop, at batch 1 and in a folder (batch 16):
   the original's loop (its size: dim 128, mults 1,2,3,3; the encoder run at every one of 350 steps, float32),
   our faithful DDPM loop, the previous default (DDIM 100, guided) and the shipped default (the checkpoint's
   sampler, OpenVINO on a CPU; a distilled student's loops are its teacher's, and its teacher is run too).
   The slow loops are extrapolated from timed steps; the shipped default is run on the examples' three greyscale
   faces, and on a 4000x2667 scan (a photo enlarged, with grain; and noise, the colour conversion's worst case).
3. The whole command, as a user runs it: `python inference.py` on one photo, and on a folder of 32 (the faces).
4. The web page: app.py started, a photo uploaded in headless Chromium, the seconds from pressing Colorize to
   its results shown (timed in the page), for a face and for the scan.
"""
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import inference  # first: it sets OMP_WAIT_POLICY before torch starts OpenMP (see there)
import numpy as np
import skimage.data
import torch
from PIL import Image

from model import ColorDiffusion, Config, guidance_scales, load_model, timesteps
from runtime import fast_runtime
from utils import ArgumentParser, bf16_is_fast, load_image, pick_device

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "examples")
FACES = ("004150.jpg", "012952.jpg", "019432.jpg")  # greyscale CelebA photos of people in no training photo
PHOTO = (218, 178)  # their height and width
SCAN = (2667, 4000)  # and of a 10-megapixel scan
ORIGINAL = Config(dim=128, dim_mults=(1, 2, 3, 3), timesteps=350, attention=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats, max_time):
    fn()  # warm-up: kernels chosen, shapes compiled
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < 1.0 and len(times) < 50):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_time:
            break
    return statistics.median(times)


def step_inputs(model, batch, device, size=None):
    h, w = inference.model_size(model, *PHOTO, size)
    L = torch.rand(batch, 1, h, w, device=device) * 2 - 1
    x = torch.randn(batch, model.unet.init_conv.in_channels, h, w, device=device)
    with torch.inference_mode():
        feats = model.encoder(L)
    w = torch.full((batch,), model.config.guidance, device=device) if model.config.guidance_input else None
    return x, torch.full((batch,), 100, device=device), feats, w


def runtimes(model, ov, device, use_amp, compile_too):
    """name -> unet(x, t, feats, w) for each runtime available here (`ov`: the OpenVINO runtime, or None)."""
    def torch_unet(amp):
        def run(x, t, feats, w):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return model.unet(x, t, feats, w)
        return run
    out = {"torch float32": torch_unet(False)}
    if use_amp:
        out["torch bf16 autocast"] = torch_unet(True)
    if compile_too:
        compiled = torch.compile(model.unet)

        def run(x, t, feats, w):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                return compiled(x, t, feats, w)
        out["torch.compile" + (" bf16" if use_amp else "")] = run
    if ov is not None:
        out[f"OpenVINO {ov.precision}"] = ov.unet
    return out


def per_photo(model, device, batch, steps, guided, amp, repeats, encoder_every_step=False, size=None):
    """Seconds per photo of a loop of `steps` UNet steps (pairs when guided), from the median step time, at
    short side `size` (default: the checkpoint's)."""
    x, t, feats, w = step_inputs(model, batch * (2 if guided else 1), device, size)
    L = torch.rand(batch, 1, *x.shape[-2:], device=device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.unet(x, t, model.encoder(L) if encoder_every_step else feats, w)
    return steps * median_time(step, device, repeats, 10.0) / batch


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def web_latency(checkpoint, photos, repeats):
    """Median seconds from pressing Colorize on the page to its results shown, for each photo: app.py started,
    the photo uploaded in headless Chromium (as a user drops it, before pressing), the time taken in the page
    (tests/browser.py). None where Chromium or Playwright is missing."""
    sys.path.insert(0, os.path.join(HERE, "tests"))
    from browser import CHROMIUM, launch_chromium, open_app, running_app, timed_colorize, upload
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not os.path.exists(CHROMIUM):
        return None
    medians = []
    with running_app(checkpoint) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_app(browser, url)
        for photo in photos:
            upload(page, photo)
            timed_colorize(page)  # the first request compiles for this photo's shape
            medians.append(statistics.median(timed_colorize(page) for _ in range(repeats)))
        browser.close()
    return medians


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=inference.DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--quick", action="store_true", help="fewer repeats, and no torch.compile")
    p.add_argument("--folder", type=int, default=32, help="photos in the folder of part 3")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    use_amp = bf16_is_fast(device)
    repeats = 3 if args.quick else 10
    model = load_model(args.checkpoint, device)
    c = model.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    h, w = inference.model_size(model, *PHOTO)
    print(f"# Color Diffusion benchmark: {where}; torch {torch.__version__}; model resolution {h}x{w}\n")

    print("## One UNet step (ms)\n\n| runtime | batch 1 | batch 2 | batch 16 |\n|---|---|---|---|")
    ov = fast_runtime(model)
    ov = None if ov is model else ov
    for name, unet in runtimes(model, ov, device, use_amp, not args.quick).items():
        ms = [1e3 * median_time(lambda: unet(*inputs), device, repeats, 10.0)
              for inputs in (step_inputs(model, b, device) for b in (1, 2, 16))]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in ms) + " |", flush=True)

    print("\n## Seconds per photo (ratio: how many times faster than the original's loop)\n")
    print("| sampler | UNet passes | batch 1: s/photo | ratio | folder (batch 16): s/photo | ratio |")
    print("|---|---|---|---|---|---|")
    original = ColorDiffusion(ORIGINAL).eval().to(device)
    # a distilled student learned 2-step jumps of its teacher's guided sampling: the step-by-step loops are the
    # teacher's, and the teacher's own sampling is run beside the student's
    teacher = load_model(inference.TEACHER_CHECKPOINT, device) if c.distil_steps else model
    tc, n_ddpm = teacher.config, len(teacher.sampling_schedule())

    def unet_steps(m, steps, spacing):  # (UNet evaluations, of them guided pairs) of one sample of model m;
        # a student runs once at a guided step, and an antithetic start evaluates its first step twice
        mc, ac = m.config, m.sampling_schedule()
        paired = {} if mc.guidance_input else guidance_scales(m.alphas_cumprod, mc.guidance, mc.guidance_interval,
                                                              (len(ac) - 1, mc.guidance_first or mc.guidance))
        ts = [t for t, _, _ in timesteps(ac, steps, spacing)]
        ts += ts[:1] if mc.sample_antithetic else []
        return len(ts), sum(t in paired for t in ts)
    n, k = unet_steps(teacher, n_ddpm, "linspace")
    rows = [("the original's loop (dim 128, 350 steps, encoder every step, float32)", 350,
             [per_photo(original, device, b, 350, False, False, repeats, True) for b in (1, 16)]),
            (f"our DDPM loop ({n_ddpm} steps{', the first twice' if tc.sample_antithetic else ''}: "
             f"{k} of {n} UNet evaluations guided)", n + k,
             [per_photo(teacher, device, b, k, True, use_amp, repeats) +
              per_photo(teacher, device, b, n - k, False, use_amp, repeats) for b in (1, 16)]),
            ("previous default: DDIM 100, eta 1, guidance 1.1, PyTorch, at the training size", 200,
             [per_photo(teacher, device, b, 100, True, use_amp, repeats, size=tc.image_size) for b in (1, 16)])]
    # the shipped default (and a student's teacher), run for real through colorize_batch: encoder, sampler,
    # recombination at full size
    # real photos, not noise: the colour conversion's work and the JPEGs' decoding are then a photo's
    faces = [load_image(os.path.join(EXAMPLES, f)) for f in FACES]
    photos = [faces[i % len(faces)] for i in range(16)]
    for m, label in ([(teacher, "its teacher")] if teacher is not model else []) + [(model, "shipped default")]:
        real, mc = [], m.config
        for batch in (1, 16):
            run = lambda: inference.colorize_batch(m, photos[:batch], seed=0, batch_size=batch)  # noqa
            real.append(median_time(run, device, max(1, repeats // (1 if batch == 1 else 3)), 20.0) / batch)
        sampler = f"{mc.sampler} {mc.sample_steps}" + (" (trailing)" if mc.sample_spacing == "trailing" else "") + \
            (f", eta {mc.sample_eta}" if mc.sampler != "ddim" or mc.sample_eta else "")
        guidance = f", guidance {mc.guidance}" + (" (distilled: one pass)" if mc.guidance_input else "") + \
            (f" ({mc.guidance_first} at the first step)" if mc.guidance_first not in (0, mc.guidance) else "") + \
            (f" at signal {mc.guidance_interval[0]}-{mc.guidance_interval[1]}" if mc.guidance_interval != (0, 1)
             else "")
        rows.append((f"**{label}: {sampler}{guidance if mc.guidance != 1 else ''}"
                     f"{', antithetic start' if mc.sample_antithetic else ''}, "
                     f"{'OpenVINO' if ov else 'PyTorch'}** (run, not extrapolated)",
                     sum(unet_steps(m, mc.sample_steps, mc.sample_spacing)), real))
    base = rows[0][2]
    for name, passes, (one, folder) in rows:
        print(f"| {name} | {passes} | {one:.3f} | {base[0] / one:.0f}x | {folder:.3f} | {base[1] / folder:.0f}x |",
              flush=True)
    # a scan: the network sees 144x96 of it, the rest is reading its L and writing its colours at full size. A
    # 741x500 photo (scikit-image's motorcycle) enlarged 5.4x, with a film's grain; and noise, every pixel a
    # random grey: the colour conversion's worst case (most pixels out of gamut)
    rng = np.random.default_rng(0)
    grey = np.asarray(Image.fromarray(skimage.data.stereo_motorcycle()[0]).convert("L")
                      .resize(SCAN[::-1], Image.BICUBIC), np.float32)
    scans = {"photo": Image.fromarray((grey + rng.normal(0, 6, SCAN)).clip(0, 255).round().astype(np.uint8)),
             "noise": Image.fromarray(rng.integers(0, 256, SCAN, dtype=np.uint8))}
    seconds = {name: median_time(lambda: inference.colorize(model, scan, seed=0), device, max(1, repeats // 3), 20.0)
               for name, scan in scans.items()}
    print(f"\n`colorize()` of a {SCAN[1]}x{SCAN[0]} greyscale scan: {seconds['photo']:.2f} s "
          f"(a photo, enlarged, with grain); {seconds['noise']:.2f} s (noise: the gamut fit's worst case)")

    print("\n## The whole command (a new process; on a CPU: Python, the converted sampler from OpenVINO's cache)\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        os.makedirs(folder)
        for i in range(args.folder):
            shutil.copy(os.path.join(EXAMPLES, FACES[i % len(FACES)]), os.path.join(folder, f"{i:03d}.jpg"))
        cmd = [sys.executable, os.path.join(HERE, "inference.py"), "--checkpoint", args.checkpoint,
               "--device", args.device, "--overwrite"]
        one = [*cmd, "--image-path", os.path.join(folder, "000.jpg"), "--output", os.path.join(tmp, "one.png")]
        whole = [*cmd, "--image-path", folder, "--output", os.path.join(tmp, "out")]
        for run in (one, whole):  # the first runs convert for OpenVINO and compile each batch shape, once
            subprocess.run(run, check=True, capture_output=True)
        t = time.perf_counter()
        subprocess.run(one, check=True, capture_output=True)
        single = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(whole, check=True, capture_output=True)
        many = time.perf_counter() - t
        print(f"| command | seconds | photos/s |\n|---|---|---|\n| one photo | {single:.2f} | {1 / single:.1f} |\n"
              f"| a folder of {args.folder} | {many:.2f} | {args.folder / many:.1f} |")
        scans["photo"].save(os.path.join(tmp, "scan.jpg"), quality=95)
        web = web_latency(args.checkpoint, [os.path.join(folder, "000.jpg"), os.path.join(tmp, "scan.jpg")],
                          max(repeats, 5))
        print("\n## The web page: Colorize pressed to result shown (s, in headless Chromium)\n")
        if web is None:
            print("(not measured: it needs Playwright, from requirements.txt, and Debian's Chromium: "
                  "apt install chromium)")
        else:
            print(f"| a {PHOTO[1]}x{PHOTO[0]} photo | the {SCAN[1]}x{SCAN[0]} scan |\n|---|---|\n"
                  f"| {web[0]:.2f} | {web[1]:.2f} |")


if __name__ == "__main__":
    main()
