"""How fast is colorization on this machine? Prints a markdown table.

    python benchmark.py                  # CPU or GPU (auto), a minute or two on 2 CPU cores
    python benchmark.py --quick          # fewer timed steps
    python benchmark.py --device cpu --threads 1 --amp off

For the shipped checkpoint's model and sampling settings (guided, and unguided: guidance runs the UNet on
twice the batch) and the original repository's size (dim 128, mults 1,2,3,3), at batch sizes 1 and 16,
randomly initialised (speed does not depend on the weights), at the model resolution of a 178x218 CelebA
photo: milliseconds per denoising step, and seconds per image for DDIM with inference.DEFAULT_STEPS steps
and for the full DDPM loop over every timestep the shipped start uses. The
per-image times are the encoder (once per image) plus steps x the measured step time: the DDPM loop is
extrapolated from a few timed steps, not run. Step times are medians over the timed steps, so a busy
machine's spikes count less. Last, one real end-to-end colorize() of a 178x218 photo with the default
settings, and the time to load a checkpoint.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

if __name__ == "__main__":  # as the command line does (see inference.py): robust on a busy machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image

import inference
from model import CheckpointError, ColorDiffusion, Config, load_checkpoint, load_model, save_checkpoint
from utils import bf16_is_fast, pick_device

PHOTO = (218, 178)  # height, width of a CelebA photo


def shipped_config():
    """The shipped checkpoint's config (Config() if there is none): its model and sampling settings."""
    try:
        return Config.from_dict(load_checkpoint(inference.DEFAULT_CHECKPOINT)["config"])
    except CheckpointError:
        return Config()


def models(c):
    """Rows of the table: the shipped model, guided (if it is) and unguided, and the original's size."""
    name = f"default (dim {c.dim}; {','.join(map(str, c.dim_mults))})"
    rows = [(f"{name}, guidance {c.guidance}", c)] if c.guidance != 1 else []
    rows.append((f"{name}, unguided", Config.from_dict({**c.to_dict(), "guidance": 1.0})))
    return rows + [("original size (dim 128; 1,2,3,3)", Config(dim=128, dim_mults=(1, 2, 3, 3)))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def gflops(model, L):
    from torch.utils.flop_counter import FlopCounterMode
    feats = model.encoder(L)
    x = torch.randn(L.shape[0], 3, *L.shape[2:], device=L.device)
    with FlopCounterMode(display=False) as counter:
        model.unet(x, torch.zeros(L.shape[0], dtype=torch.long, device=L.device), feats)
    return counter.get_total_flops() / 1e9 * (2 if model.config.guidance != 1 else 1)  # guided: two UNet passes


def bench_steps(model, batch, device, amp, repeats, min_time, max_time):
    """(encoder seconds, median seconds per denoising step, steps timed) for one batch."""
    h, w = inference.model_size(model, *PHOTO)
    L = torch.rand(batch, 1, h, w, device=device).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    x = torch.randn(batch, 2, h, w, device=device)
    with torch.inference_mode(), amp():
        model.encoder(L)  # warm-up: first calls pick kernels
        enc = timed(lambda: model.encoder(L), device)
        denoise = model.denoiser(L, model.config.guidance)
        denoise(x, model.config.timesteps - 1)
        times, start = [], time.perf_counter()
        while True:
            t = int(torch.randint(0, model.config.timesteps, ()))
            times.append(timed(lambda: denoise(x, t), device))
            elapsed = time.perf_counter() - start
            if (len(times) >= repeats and elapsed >= min_time) or elapsed >= max_time:
                break
    return enc, statistics.median(times), len(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed denoising steps per row (at least)")
    p.add_argument("--quick", action="store_true", help="fewer, shorter timings (about 3x faster)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast; auto as in inference.py: on where bf16 is fast")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    use_amp = bf16_is_fast(device) if args.amp == "auto" else args.amp == "on"
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else nullcontext
    repeats, min_time, max_time = (2, 0.3, 3.0) if args.quick else (args.repeats, 1.0, 8.0)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# Color Diffusion benchmark: {where}; torch {torch.__version__}; "
          f"bf16 autocast {'on' if use_amp else 'off'}")
    shipped = shipped_config()
    reference = ColorDiffusion(shipped)
    n_ddpm = len(reference.sampling_schedule())
    h, w = inference.model_size(reference, *PHOTO)
    print(f"Model resolution {h}x{w} (a {PHOTO[1]}x{PHOTO[0]} photo); DDIM {inference.DEFAULT_STEPS} steps; "
          f"DDPM = all {n_ddpm} steps from the shipped start, extrapolated from the timed steps.\n")
    print("| model | params | GFLOP/step/image | batch | ms/step | ms/step/image | "
          f"DDIM {inference.DEFAULT_STEPS}: s/image | DDPM {n_ddpm}: s/image | steps timed |")
    print("|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    default_model = None
    for name, config in models(shipped):
        model = ColorDiffusion(config).eval().to(device, memory_format=torch.channels_last)
        if default_model is None:
            default_model = model
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.inference_mode():
            flops = gflops(model, torch.zeros(1, 1, h, w, device=device))
        for batch in batches:
            enc, step, n = bench_steps(model, batch, device, amp, repeats, min_time, max_time)
            ddim = (enc + inference.DEFAULT_STEPS * step) / batch
            ddpm = (enc + n_ddpm * step) / batch
            print(f"| {name} | {n_params:.1f}M | {flops:.1f} | {batch} | {step * 1e3:.1f} | "
                  f"{step * 1e3 / batch:.1f} | {ddim:.2f} | {ddpm:.1f} | {n} |", flush=True)
        if model is not default_model:
            del model

    # end to end, as a user sees it: load a checkpoint, colorize one photo with the shipped settings
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        save_checkpoint(path, {"config": shipped.to_dict(),
                               "ema": {k: v.half() for k, v in default_model.state_dict().items()}})
        t = time.perf_counter()
        model = load_model(path, device).to(memory_format=torch.channels_last)
        load = time.perf_counter() - t
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, PHOTO, dtype=np.uint8), "L")
    amp_arg = None if args.amp == "auto" else use_amp
    inference.colorize(model, photo, steps=2, amp=amp_arg)  # warm-up
    runs = [timed(lambda: inference.colorize(model, photo, seed=0, amp=amp_arg), device)
            for _ in range(1 if args.quick else 2)]
    print(f"\nEnd to end, the shipped model and settings (DDIM {inference.DEFAULT_STEPS}, guidance "
          f"{shipped.guidance}), one {PHOTO[1]}x{PHOTO[0]} photo: colorize() {min(runs):.2f} s (best of {len(runs)}); "
          f"loading the checkpoint {load:.2f} s (plus Python and torch start-up for a command-line run).")


if __name__ == "__main__":
    main()
