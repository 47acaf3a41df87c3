"""Colorize photos with a trained Color Diffusion checkpoint.

    python inference.py --image-path photo.jpg                     # -> ./photo_color.jpg
    python inference.py --image-path photo.jpg --output out.png --num-samples 4 --seed 0
    python inference.py --image-path photos/                       # -> photos_color/, one file per image
    python inference.py --image-path photo.jpg --save-gif steps.gif  # the denoising process, animated

The model predicts ab at its own resolution (short side: the checkpoint's sample_size, or --size); ab is
then upsampled to the input's full size and recombined with the input's own full-resolution L, so no detail
is lost. A colour photo is colorized from its lightness alone. `python inference.py --help` lists every flag.
"""
import argparse
import math
import os
import sys
import time

# OpenMP threads that spin while they wait for each other collapse when another process keeps the cores busy:
# one step of the default model went from ~30 ms to 0.2-1.8 s on 2 cores beside a training run, and stayed
# at ~30-80 ms with passive waiting. Set before torch loads OpenMP: the command line, app.py, evaluate.py and
# benchmark.py import this module first. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image
from tqdm import tqdm

from gif import GifRecorder
from runtime import ConvertedSampler, converted_sampler, fast_runtime
from utils import (GREY_LIGHTNESS, IMAGE_EXTENSIONS, SAMPLER_NAMES, SAMPLING_LIMITS, SPACINGS, ArgumentParser,
                   CheckpointError, ImageError, comma_separated, guidance_check, interval_check, is_greyscale,
                   lab_to_rgb8, lightness, list_images, load_image, may_have_gpu, pick_device, pil_to_array,
                   range_check, rgb_to_lab, save_image, use_bf16)

# PyTorch is imported only where a network runs in it: the default command on a CPU runs a ConvertedSampler
# (runtime.py) and starts in a third of the time without it

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINT = os.path.join(HERE, "checkpoints", "photos64_distilled.pt")  # 2 UNet passes a photo
TEACHER_CHECKPOINT = os.path.join(HERE, "checkpoints", "photos64.pt")  # its teacher: 8 passes, any guidance, --ddpm
DEFAULT_BATCH = 16
STRIP_PIXELS = 1 << 19  # recombine() works on horizontal strips of about this many pixels
# PIL's defaults, changed: JPEG quality 75 blurs L; PNG level 6 takes 1.9 s to write a 10-megapixel result,
# level 4 0.75 s for 10% more bytes
SAVE_PARAMS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {"compress_level": 4}}
EXIF_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF"}
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # greyscale deeper than 8 bits


def _wide_grey(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float greyscale image -> (H, W) float32 in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    if img.mode.startswith("I;16"):
        top = 65535.0  # 16-bit, even when the picture happens to be dark
    else:  # 32-bit int or float: guess the range from the values
        peak = float(arr.max()) if arr.size else 0.0
        top = 1.0 if img.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
    return np.clip(arr / top, 0, 1)


def _rgb(img: Image.Image) -> Image.Image:
    """img.convert("RGB"), or ImageError for a mode PIL cannot convert (e.g. a LAB-mode TIFF)."""
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"unsupported colour mode {img.mode} ({e})") from None


def greyscale_rgb(img: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    """Any PIL image -> ((1, 3, H, W) float32 RGB in [0, 1], alpha channel or None).
    Colour photos keep their RGB here: only their L is used. 16-bit greyscale keeps its precision."""
    alpha = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
    if img.mode in WIDE_MODES:
        return np.broadcast_to(_wide_grey(img), (1, 3, img.height, img.width)), alpha
    return pil_to_array(_rgb(img)), alpha


def model_resolution(h, w, short, multiple=8, max_aspect=4):
    """The size the model runs at: short side `short`, aspect kept, each side a multiple of `multiple` so every
    UNet level divides evenly. The long side is capped at max_aspect x short (a 1x5000 strip would otherwise
    run the model at 64x320000)."""
    s = min(short / min(h, w), max_aspect * short / max(h, w))
    return (max(multiple, round(h * s / multiple) * multiple), max(multiple, round(w * s / multiple) * multiple))


def short_side(model, size=None):
    """The short side the model samples at: `size`, else the checkpoint's sample_size, else its training size.
    The shipped checkpoint samples at 96, above its training size of 64: a face in a whole photo gets as many
    pixels as in training's zoomed-in crops (more accurate on whole photos, and faces about as bold whether
    they fill the frame or not; docs/experiments.md, section 14)."""
    return size or model.config.sample_size or model.config.image_size


def model_size(model, h, w, size=None):
    """model_resolution at short_side(model, size), for this model's UNet depth."""
    return model_resolution(h, w, short_side(model, size), 2 ** (len(model.config.dim_mults) - 1))


def model_input(model, img: Image.Image, size=None) -> np.ndarray:
    """The greyscale the model sees: (1, 1, h, w) normalized L at model_size: PIL's antialiased bicubic resize
    of the image, then its L (the path the training data took), before anything is converted at full size: a
    scan's 10 megapixels cost milliseconds. Deep greyscale is resized as floats, keeping its precision."""
    h, w = model_size(model, img.height, img.width, size)
    if img.mode in WIDE_MODES:
        grey = np.asarray(Image.fromarray(_wide_grey(img), "F").resize((w, h), Image.BICUBIC))
        return lightness(np.broadcast_to(grey, (1, 3, h, w)))
    # L and RGB are resized as they are: a greyscale scan is not made RGB at full size
    return lightness(pil_to_array((img if img.mode in ("L", "RGB") else _rgb(img)).resize((w, h), Image.BICUBIC)))


def load_hints(path_or_image, size) -> np.ndarray:
    """Colour hints from an RGBA image (a path or PIL image) whose opaque pixels are the hints, scaled to
    `size` = (W, H) of the photo -> (1, 3, H, W): the hinted normalized ab, and a mask of the hinted pixels."""
    img = load_image(path_or_image) if isinstance(path_or_image, (str, os.PathLike)) else path_or_image
    name = path_or_image if isinstance(path_or_image, (str, os.PathLike)) else "hints"
    if "A" not in img.getbands() and "transparency" not in img.info:
        raise ImageError(f"{name}: hints need transparency (an RGBA image whose opaque pixels are the hints)")
    rgba = np.asarray(img.convert("RGBA").resize(size, Image.NEAREST), dtype=np.float32).transpose(2, 0, 1)[None]
    mask = (rgba[:, 3:] > 127).astype(np.float32)
    if not mask.any():
        raise ImageError(f"{name}: no hints (every pixel is transparent)")
    return np.concatenate([rgb_to_lab(rgba[:, :3] / 255)[:, 1:] * mask, mask], axis=1)


def model_hints(hints: np.ndarray, h, w) -> np.ndarray:
    """Full-size hints (1, 3, H, W) -> the model's resolution: each hinted model pixel takes the mean colour of
    the hinted photo pixels it covers."""
    import torch  # hinted sampling runs in PyTorch's path (model.sample spreads the hints) anyway
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(hints), (h, w))
    mask = pooled[:, 2:] > 0
    return torch.cat([pooled[:, :2] / pooled[:, 2:].clamp(min=1e-8) * mask, mask.float()], dim=1).numpy()


def full_lightness(img: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    """The input's own L at full resolution (1, 1, H, W), and its alpha channel or None. 8-bit greyscale (most
    scans) through a table of its 256 levels; other images in strips: a 12-megapixel photo's temporaries would
    take gigabytes at once."""
    if img.mode in ("L", "LA"):
        grey = np.asarray(img.getchannel("L"))
        return GREY_LIGHTNESS[grey][None, None], img.getchannel("A") if img.mode == "LA" else None
    rgb, alpha = greyscale_rgb(img)
    rows = max(1, STRIP_PIXELS // rgb.shape[-1])
    return np.concatenate([lightness(rgb[..., top:top + rows, :]) for top in range(0, rgb.shape[-2], rows)], -2), alpha


def upsample(ab: np.ndarray, H, W) -> np.ndarray:
    """ab (2, h, w) -> (2, H, W), PIL's bilinear resize of each channel (antialiased when it shrinks)."""
    return np.stack([np.asarray(Image.fromarray(c, "F").resize((W, H), Image.BILINEAR)) for c in ab])


def recombine(img: Image.Image, ab: np.ndarray, hints: np.ndarray | None = None) -> list[Image.Image]:
    """The input's own full-resolution L + each of the K samples ab (K, 2, h, w), upsampled to its size ->
    K PIL RGB images (RGBA if the input had alpha). The input's L is computed once for all K. Hinted pixels
    (full-size `hints`, see load_hints) take the hinted colour. Colours outside sRGB lose chroma, not
    lightness, so the outputs keep the input's L."""
    L, alpha = full_lightness(img)
    H, W = L.shape[-2:]
    rows = max(1, STRIP_PIXELS // W)
    outs = []
    for k in range(len(ab)):
        ab_full = upsample(np.asarray(ab[k], np.float32), H, W)[None]
        if hints is not None:
            ab_full = np.where(hints[:, 2:] > 0, hints[:, :2], ab_full)
        out = np.empty((H, W, 3), np.uint8)
        for top in range(0, H, rows):
            lab = np.concatenate([L[..., top:top + rows, :], ab_full[..., top:top + rows, :]], axis=1)
            out[top:top + rows] = lab_to_rgb8(lab)[0]
        out = Image.fromarray(out)
        if alpha is not None:
            out.putalpha(alpha)
        outs.append(out)
    return outs


def _sample(model, L, generators, hints, callback, amp, runtime, sampling):
    """ab_n (N, 2, h, w) of model-input L (N, 1, h, w), each row's noise drawn from its numpy generator: by a
    ConvertedSampler (the checkpoint's own settings, nothing else), or by a model on the runtime given."""
    if isinstance(model, ConvertedSampler):
        asked = [k for k, v in sampling.items() if v is not None]
        if asked or hints is not None or callback is not None:
            raise ValueError(f"a converted sampler samples as its checkpoint does: not with "
                             f"{', '.join(asked) or ('hints' if hints is not None else 'a callback')}")
        return model(L, np.stack([g.standard_normal((model.draws, 2, *L.shape[2:]), dtype=np.float32)
                                  for g in generators]))
    import torch
    device = next(model.parameters()).device
    runtime = fast_runtime(model) if runtime is None else runtime
    amp = use_bf16(device, amp) and runtime is model  # autocast is PyTorch's
    L = torch.from_numpy(L).to(device).contiguous(memory_format=torch.channels_last)
    hints = None if hints is None else torch.from_numpy(hints).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        ab = model.sample(L, hints=hints, generator=generators, callback=callback, runtime=runtime, **sampling)
    return ab.float().cpu().numpy()


def colorize_batch(model, images, num_samples=1, seed=None, callback=None, amp=None, batch_size=DEFAULT_BATCH,
                   hints=None, runtime=None, size=None, **sampling):
    """Colorize a list of PIL images: returns, per image, a list of `num_samples` PIL images at that image's
    exact size. `model`: a ColorDiffusion (load_model), or a ConvertedSampler (runtime.converted_sampler: its
    checkpoint's settings only). Images with the same model resolution are sampled together, up to `batch_size`
    rows (an image with num_samples=K takes K rows). `sampling` (sampler, steps, eta, min_signal, guidance,
    guidance_first, guidance_interval, antithetic, spacing, dynamic_thresholding) goes to model.sample: what is
    not given is the checkpoint's. `hints`: per image, None or full-size hints (load_hints). `runtime`: what runs
    the networks (runtime.py; default: fast_runtime's, OpenVINO on a CPU; `model` itself for PyTorch). `size`:
    the short side the model runs at (short_side). `seed`: one for every image, or a list, one per image;
    sample k of an image is drawn from its seed + k alone (numpy's generator, on every runtime), so an image gets
    the same colours whatever it is batched with (up to float rounding) and the same call gives the same result
    bit for bit. amp: bf16 autocast of PyTorch's runtime, see utils.use_bf16 (None: where it is fast).
    callback(i, n, x_t, x0) sees each step of each batch (model-space tensors, num_samples rows per image)."""
    seeds = [seed] * len(images) if isinstance(seed, int) else seed
    smalls = [model_input(model, img, size) for img in images]
    hinted = hints is not None and any(h is not None for h in hints)
    groups = {}  # model resolution -> indices, in order of first appearance
    for i, L in enumerate(smalls):
        groups.setdefault(tuple(L.shape[-2:]), []).append(i)
    per_batch = max(1, batch_size // num_samples)
    results = [None] * len(images)
    for idx in groups.values():
        for start in range(0, len(idx), per_batch):
            chunk = idx[start:start + per_batch]
            L = np.concatenate([smalls[i] for i in chunk]).repeat(num_samples, axis=0)
            small_hints = None
            if hinted:  # images without hints get an empty mask
                small_hints = np.concatenate([model_hints(hints[i], *L.shape[-2:]) if hints[i] is not None
                                              else np.zeros((1, 3, *L.shape[-2:]), np.float32) for i in chunk])
                small_hints = small_hints.repeat(num_samples, axis=0)
            # sample k of an image draws its noise from seed + k alone: the same colours alone or in a folder
            generators = [np.random.default_rng(None if seeds is None else seeds[i] + k)
                          for i in chunk for k in range(num_samples)]
            ab = _sample(model, L, generators, small_hints, callback, amp, runtime, sampling)
            for j, i in enumerate(chunk):  # one at a time: a full-size 4000x4000 LAB image is large
                results[i] = recombine(images[i], ab[j * num_samples:(j + 1) * num_samples],
                                       None if hints is None else hints[i])
    return results


def colorize(model, img: Image.Image, num_samples=1, seed=None, callback=None, amp=None, hints=None,
             runtime=None, **sampling):
    """Colorize one image: returns `num_samples` PIL images (RGB, or RGBA if the input had alpha) at the
    input's exact size; `hints` (full-size, load_hints), `runtime` and `sampling` as in colorize_batch.
    callback(i, n, x_t, x0) sees each step."""
    return colorize_batch(model, [img], num_samples=num_samples, seed=seed, callback=callback, amp=amp,
                          batch_size=num_samples, hints=None if hints is None else [hints], runtime=runtime,
                          **sampling)[0]


# ---------------------------------------------------------------------------------------------------------
# command line

class UsageError(Exception):
    """A problem with the command line or the paths it names; the message is one line for the user."""


def add_sampling_args(p):
    """The sampler flags, for this command line and evaluate.py; each defaults to the checkpoint's setting."""
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="ddim, dpm++2m (fewer steps), or ddpm: the full "
                   "ancestral loop over every timestep (slow). Default: the checkpoint's")
    p.add_argument("--ddpm", action="store_const", const="ddpm", dest="sampler", help="the same as --sampler ddpm: "
                   "the faithful ancestral loop over every timestep. The checkpoint's guidance is chosen for its few "
                   "steps and is garish here; --ddpm --guidance 1 --guidance-first 0 is the original's unguided loop")
    p.add_argument("--steps", type=int, help="denoising steps (ddim, dpm++2m; default: the checkpoint's). The "
                   "guidance is chosen for the default: more steps guide more often and colour more boldly, so "
                   "lower --guidance with them")
    p.add_argument("--spacing", choices=SPACINGS, help="where the steps lie: linspace ends at t = 0, a step that "
                   "barely changes the photo; trailing leaves it out, so the same grid takes one step fewer "
                   "(ddim, dpm++2m; default: the checkpoint's)")
    p.add_argument("--eta", type=float, help="fresh noise per step: 0 deterministic, 1 DDPM-like, more re-noises "
                   "more (ddim, dpm++2m; default: the checkpoint's)")
    p.add_argument("--min-signal", type=float,
                   help="start sampling at the noisiest step whose signal level is still this: lower gives "
                   "bolder, less accurate colours (default: the checkpoint's)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale of the guided steps, the first too unless --guidance-first "
                   "gives it its own: above 1 bolder colours, 1 none (default: the checkpoint's)")
    p.add_argument("--guidance-first", type=float, help="the first step's guidance scale, where the colours are "
                   "chosen: lower than --guidance moves colour from faces to the whole photo; 0 = --guidance's "
                   "(default: the checkpoint's)")
    p.add_argument("--guidance-interval", metavar="LOW,HIGH", type=comma_separated(float),
                   help="guide only the steps whose signal level is in this range, e.g. 0,1 every step "
                   "(default: the checkpoint's)")
    p.add_argument("--antithetic", action=argparse.BooleanOptionalAction,
                   help="average the first step's guess over the start noise and its negation: steadier colours "
                   "(default: the checkpoint's)")
    p.add_argument("--dynamic-threshold", action="store_const", const=True, help="Imagen's dynamic thresholding of x0")
    p.add_argument("--size", type=int, help="the short side in pixels the model colours a photo at (its colours "
                   "are then upsampled onto the photo's own L): smaller is faster and coarser (default: the "
                   "checkpoint's)")


def check_sampling_args(p, args):
    if args.sampler == "ddpm" and (args.steps is not None or args.eta is not None):
        p.error("--ddpm (--sampler ddpm) runs every timestep with eta 1: leave out --steps and --eta")
    checks = [range_check(getattr(args, name), f"--{name.replace('_', '-')}", *limits)
              for name, limits in SAMPLING_LIMITS.items() if getattr(args, name) is not None]
    for ok, message in checks + [interval_check(args.guidance_interval or (0, 1), "--guidance-interval")]:
        if not ok:
            p.error(message)


def sampling_kwargs(args):
    """model.sample's settings from the flags of add_sampling_args (None: the checkpoint's)."""
    return dict(sampler=args.sampler, steps=args.steps, eta=args.eta, min_signal=args.min_signal,
                guidance=args.guidance, guidance_first=args.guidance_first, guidance_interval=args.guidance_interval,
                antithetic=args.antithetic, spacing=args.spacing,
                dynamic_thresholding=args.dynamic_threshold, size=args.size)


def parse_args(argv=None):
    p = ArgumentParser(description="Colorize greyscale photos (a file or every image in a folder) with Color "
                       "Diffusion.")
    p.add_argument("--image-path", required=True, help="an image, or a folder of images")
    p.add_argument("--checkpoint", help="model checkpoint (.pt). Default: checkpoints/photos64_distilled.pt "
                   "(2 UNet passes), or its teacher with --teacher or --ddpm")
    p.add_argument("--teacher", action="store_true", help="the default's teacher, checkpoints/photos64.pt: the "
                   "colours the default learned, in 8 UNet passes (3-5x the time), and any --guidance")
    p.add_argument("--output", help="output file (its extension picks the format: .png .jpg .webp .tif .bmp) "
                   "or folder. Default: ./<name>_color.<ext> for a file, <folder>_color/ for a folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs never are)")
    p.add_argument("--skip-existing", action="store_true", help="leave images whose outputs exist alone")
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=1,
                   help="colorizations per image, written as <name>_0, <name>_1, ...")
    p.add_argument("--seed", type=int, help="random seed: the same command gives the same output bit for bit, "
                   "and a photo gets the same colours alone or in a folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--hints", metavar="PNG", help="colour hints: an RGBA image (any size, scaled to the photo's) "
                   "whose opaque pixels give their colour; the regions around them follow")
    p.add_argument("--runtime", choices=("auto", "openvino", "torch"), default="auto",
                   help="auto: OpenVINO on a CPU (the checkpoint's own sampling converted whole, or with sampling "
                   "flags the encoder and the UNet; converted once into ~/.cache/color-diffusion), PyTorch on a GPU")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast; auto: on where bf16 is fast (CUDA, CPUs with AVX512-BF16/AMX)")
    p.add_argument("--threads", type=int, help="PyTorch's CPU threads (default: one per core; OpenVINO uses "
                   "every core)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images sampled together (folders)")
    p.add_argument("--save-gif", metavar="PATH", help="also save the denoising process as an animated GIF")
    p.add_argument("--gif-show", choices=("xt", "x0"), default="xt",
                   help="GIF frames show the noisy x_t or the model's current x0 prediction")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    for name, high in (("num_samples", 64), ("batch_size", 1024), ("threads", 1024)):
        if getattr(args, name) is not None and not 1 <= getattr(args, name) <= high:
            p.error(f"--{name.replace('_', '-')} must be from 1 to {high}")
    if args.skip_existing and args.overwrite:
        p.error("--skip-existing and --overwrite contradict each other")
    if args.teacher and args.checkpoint:
        p.error("--teacher is a checkpoint: pass --teacher or --checkpoint, not both")
    if not args.checkpoint:  # the faithful loop is the teacher's: a student learned a 2-pass jump, not each step
        args.checkpoint = TEACHER_CHECKPOINT if args.teacher or args.sampler == "ddpm" else DEFAULT_CHECKPOINT
    return args


def _writable_ext(path):
    ext = os.path.splitext(path)[1].lower()
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{path}: cannot write '{ext or 'no extension'}' images "
                         "(use .png, .jpg, .webp, .tif or .bmp)")
    return fmt


def sample_paths(path, num_samples):
    """`out.png` -> [out.png], or [out_0.png, out_1.png, ...] for several samples."""
    if num_samples == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{k}{ext}" for k in range(num_samples)]


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_outputs(outputs, inputs, overwrite):
    """Refuse to write over an input (ever) or over an existing file (without --overwrite)."""
    for out in outputs:
        if not os.path.lexists(out):
            continue
        if any(_same_file(out, i) for i in inputs) or os.path.abspath(out) in map(os.path.abspath, inputs):
            raise UsageError(f"{out}: is an input; refusing to overwrite it (choose another --output)")
        if os.path.isdir(out):
            raise UsageError(f"{out}: is a folder")
        if not overwrite:
            raise UsageError(f"{out}: exists (pass --overwrite to replace it)")


def _make_dir(folder):
    if not folder:
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{folder}: exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{folder}: output folder is not writable")


def _is_colour(img):
    if img.mode in ("1", "L", "LA", "La", "F") or img.mode.startswith("I"):
        return False
    if max(img.size) > 1024:  # a subsample is plenty to tell colour from greyscale
        img = img.reduce(math.ceil(max(img.size) / 1024))
    return not is_greyscale(img)


def _shown(path):
    """A path as the user would type it from here: relative, unless that climbs out of this folder."""
    where = os.path.relpath(path)
    return os.path.abspath(path) if where.startswith("..") else where


def samples_as_checkpoint(args):
    """Whether a command line (this one's, evaluate.py's) samples as its checkpoint does, on a CPU with OpenVINO:
    no sampling flag but --size, no hints, no GIF (its frames are each step's), no GPU --device auto would take.
    Then runtime.converted_sampler runs it."""
    flags = [k for k, v in sampling_kwargs(args).items() if k != "size" and v is not None]
    cpu = args.device == "cpu" or (args.device == "auto" and not may_have_gpu())
    return cpu and args.runtime != "torch" and not (flags or args.hints or getattr(args, "save_gif", None))


def _load(args):
    """What the command samples with: the checkpoint's ConvertedSampler where it samples as its checkpoint does
    (runtime.py: PyTorch is not even imported), else its ColorDiffusion on --device."""
    if not os.path.exists(args.checkpoint):
        if os.path.abspath(args.checkpoint) in (DEFAULT_CHECKPOINT, TEACHER_CHECKPOINT):
            raise CheckpointError(f"no model at {_shown(args.checkpoint)}: train one with train.py, or pass "
                                  "--checkpoint PATH (e.g. runs/celeba64/ckpt.pt)")
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint")
    if not os.path.isfile(args.checkpoint):
        raise CheckpointError(f"{args.checkpoint}: not a checkpoint file")
    if samples_as_checkpoint(args):
        model = converted_sampler(args.checkpoint)
        if model is not None:  # None: no OpenVINO, or a sampling too long to convert whole
            return model
    import torch
    from model import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = load_model(args.checkpoint, device)
    # what the model cannot do, said before anything slow (a conversion for OpenVINO) starts
    if model.config.distil_steps and (args.guidance is not None or args.guidance_first is not None):
        raise UsageError(f"{_shown(args.checkpoint)} is a student that learned its teacher's guidance only: for "
                         f"another scale, use a model that guides (--teacher: {_shown(TEACHER_CHECKPOINT)})")
    for guidance in (args.guidance, args.guidance_first or None):  # --guidance-first 0: --guidance's
        if guidance is not None:
            ok, message = guidance_check(guidance, model.config.cond_drop)
            if not ok:
                raise UsageError(message)
    return model


def _file_size(path):
    """(height, width) of an image file as load_image gives it (EXIF rotation included), from its header alone;
    None if it cannot be read (load_image says why when its turn comes)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            # a PNG's EXIF may follow its pixels: PIL would decode them all to find it, so it is read only when seen
            exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
            return (w, h) if exif.get(0x0112) in (5, 6, 7, 8) else (h, w)  # rotated a quarter turn
    except Exception:
        return None


def _sampler_kwargs(args):
    return dict(num_samples=args.num_samples, seed=args.seed, amp=args.amp, **sampling_kwargs(args))


def _save_params(fmt, source: Image.Image):
    """The format's quality settings, and the input's EXIF (date, camera, ...) where the format keeps it.
    load_image has already applied and removed its orientation tag."""
    params = dict(SAVE_PARAMS.get(fmt, {}))
    exif = source.getexif()
    if len(exif) and fmt in EXIF_FORMATS:
        params["exif"] = exif
    return params


def save_result(img: Image.Image, path, source: Image.Image) -> None:
    """Write a colorized image as the command does: the format of path's extension, with its quality settings
    and the source photo's EXIF."""
    save_image(img, path, **_save_params(_writable_ext(path), source))


def run_file(args):
    src = args.image_path
    stem, ext = os.path.splitext(os.path.basename(src))
    default_name = f"{stem}_color{ext if ext.lower() in IMAGE_EXTENSIONS else '.png'}"
    out = args.output or default_name
    if os.path.isdir(out) or out.endswith(os.sep) or (os.altsep and out.endswith(os.altsep)):
        out = os.path.join(out, default_name)
    fmt = _writable_ext(out)
    outputs = sample_paths(out, args.num_samples)
    extra = [args.save_gif] if args.save_gif else []
    if args.save_gif and os.path.splitext(args.save_gif)[1].lower() != ".gif":
        raise UsageError(f"{args.save_gif}: --save-gif needs a .gif file name")
    if args.skip_existing and all(os.path.exists(o) for o in outputs):
        print(f"{out}: exists, skipped")
        return 0
    _check_outputs(outputs + extra, [src], args.overwrite)
    for folder in {os.path.dirname(p) for p in outputs + extra}:
        _make_dir(folder)

    img = load_image(src)
    hints = load_hints(args.hints, img.size) if args.hints else None
    try:
        colour = _is_colour(img)
    except ValueError as e:  # a mode PIL cannot convert to RGB, e.g. a LAB TIFF
        raise ImageError(f"{src}: cannot convert its {img.mode} pixels ({e})") from None
    if colour:
        print(f"note: {src} is a colour photo: it is colorized from its greyscale version", file=sys.stderr)
    model = _load(args)
    kwargs = _sampler_kwargs(args)
    converted = isinstance(model, ConvertedSampler)  # it samples in one call: no steps to show
    runtime = None if converted else fast_runtime(model, args.runtime)
    recorder = GifRecorder(model, model_input(model, img, args.size), args.gif_show) if args.save_gif else None
    # each step, on a terminal only; a converted sampler's are one call
    bar = tqdm(unit="step", leave=False, file=sys.stderr, disable=True if converted else None)

    def callback(i, n, x_t, x0):
        bar.total = n
        bar.update(1)
        if recorder:
            recorder(i, n, x_t, x0)
    t0 = time.time()
    results = colorize(model, img, callback=None if converted else callback, hints=hints, runtime=runtime, **kwargs)
    seconds = time.time() - t0
    bar.close()
    if results[0].mode == "RGBA" and fmt == "JPEG":
        print(f"note: JPEG has no transparency: {out} drops the alpha channel (.png keeps it)", file=sys.stderr)
    for path, result in zip(outputs, results):
        save_result(result, path, img)
        print(path)
    if recorder:
        recorder.save(args.save_gif, results)
        print(args.save_gif)
    print(f"colorized {src} ({img.width}x{img.height}) in {seconds:.1f} s", file=sys.stderr)
    return 0


def run_folder(args):
    src = os.path.normpath(args.image_path)
    if args.save_gif or args.hints:
        raise UsageError(f"{'--save-gif' if args.save_gif else '--hints'} works with a single image, not a folder")
    out_dir = args.output or os.path.relpath(os.path.abspath(src) + "_color")  # "." -> ../<name>_color
    if os.path.exists(out_dir) and _same_file(out_dir, src):
        raise UsageError(f"{out_dir}: is the input folder; choose another --output")
    try:
        names = list_images(src)
    except OSError as e:
        raise UsageError(f"{src}: cannot list the folder ({e.strerror or e})") from None
    if not names:
        raise UsageError(f"{src}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
    jobs = [(os.path.join(src, n), sample_paths(os.path.join(out_dir, n), args.num_samples)) for n in names]
    if args.skip_existing:
        jobs = [(i, o) for i, o in jobs if not all(os.path.exists(p) for p in o)]
        if len(jobs) < len(names):
            print(f"skipping {len(names) - len(jobs)} image(s) whose outputs exist", file=sys.stderr)
        if not jobs:
            return 0
    inputs = [i for i, _ in jobs]
    existing = [p for _, outs in jobs for p in outs if os.path.lexists(p)]
    if existing and not args.overwrite:
        raise UsageError(f"{len(existing)} output(s) exist in {out_dir}, e.g. {existing[0]} "
                         "(pass --overwrite to replace them, or --skip-existing)")
    _check_outputs(existing, inputs, args.overwrite)
    model = _load(args)  # first: a checkpoint that cannot do what was asked leaves no empty folder
    _make_dir(out_dir)
    per_batch = max(1, args.batch_size // args.num_samples)
    # a batch holds photos of one model resolution: each shape of batch compiles networks of its own (0.3-1 s),
    # and a folder of mixed shapes in name order would compile some for nearly every batch
    by_resolution = {}
    for job in jobs:
        size = _file_size(job[0])
        by_resolution.setdefault(model_size(model, *size, args.size) if size else None, []).append(job)
    batches = [group[i:i + per_batch] for group in by_resolution.values() for i in range(0, len(group), per_batch)]
    kwargs = _sampler_kwargs(args)
    runtime = None if isinstance(model, ConvertedSampler) else fast_runtime(model, args.runtime)

    failed, colour, done = [], 0, 0  # failed: (input path, reason), reported in the folder's order
    bar = tqdm(total=len(jobs), unit="img", dynamic_ncols=True, file=sys.stderr)
    for jobs_of_batch in batches:  # a batch's worth decoded at a time: memory stays bounded
        batch = []
        for path, outs in jobs_of_batch:
            try:
                img = load_image(path)
                colour += _is_colour(img)  # also fails here, not mid-batch, on a mode PIL cannot convert
                batch.append((path, outs, img))
            except Exception as e:
                failed.append((path, str(e) if isinstance(e, ImageError) else f"{path}: {type(e).__name__}: {e}"))
                bar.update(1)
        if not batch:
            continue
        try:  # colorize_batch samples the photos of each model resolution together
            results = colorize_batch(model, [img for _, _, img in batch], batch_size=per_batch * args.num_samples,
                                     runtime=runtime, **kwargs)
        except Exception as e:  # e.g. out of memory: report these files, go on with the rest
            failed.extend((i, f"{i}: {type(e).__name__}: {e}".splitlines()[0]) for i, _, _ in batch)
            bar.update(len(batch))
            continue
        for (i, outs, img), result in zip(batch, results):
            try:
                for path, r in zip(outs, result):
                    save_result(r, path, img)
                done += 1
            except (ImageError, UsageError) as e:
                failed.append((i, str(e)))
            bar.update(1)
    bar.close()

    if colour:
        print(f"note: {colour} colour photo(s) were colorized from their greyscale version", file=sys.stderr)
    print(f"colorized {done} of {len(jobs)} image(s) into {out_dir}", file=sys.stderr)
    for _, line in sorted(failed):
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    """The command line; returns the exit status. Every expected failure is one 'error: ...' line."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a flag error already printed: a status, not an exception
        return e.code
    try:
        if not os.path.exists(args.image_path):
            raise UsageError(f"{args.image_path}: no such file or folder")
        if os.path.isdir(args.image_path):
            return run_folder(args)
        return run_file(args)
    except (UsageError, ImageError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line; COLOR_DIFFUSION_DEBUG=1 shows the trace
        if os.environ.get("COLOR_DIFFUSION_DEBUG"):
            raise
        if "torch" in sys.modules and isinstance(e, sys.modules["torch"].OutOfMemoryError):
            print("error: out of memory: try a smaller --batch-size or --num-samples, or --device cpu",
                  file=sys.stderr)
        else:
            print(f"error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
    return 1


if __name__ == "__main__":
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # e.g. stdout piped into `head`, which has exited
        pass
    # every output is written and closed: skip the interpreter's teardown, where unloading torch alone takes 0.5 s
    os._exit(code)
