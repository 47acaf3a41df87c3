"""Colour conversion, image I/O, the sampling settings' limits and device choice: the bottom layer, in numpy and
PIL, no model code and no PyTorch here (the default command runs without it, see runtime.py).

Model-space LAB ("normalized LAB") is used everywhere above this file:
    L_n  = L / 50 - 1        L  in [0, 100]      -> L_n  in [-1, 1]
    ab_n = ab / 110          ab in about +-110   -> ab_n in about [-1, 1]   (the original's scaling)
"""
import argparse
import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

AB_NORM = 110.0
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}

# sRGB D65 matrices and white point, the same constants scikit-image uses, so both agree to float error.
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]], np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)
_XYZ2RGB = (np.linalg.inv(_RGB2XYZ.astype(np.float64)) * _WHITE).astype(np.float32)  # from XYZ relative to white


class ImageError(Exception):
    """A file that cannot be used as an image; the message is meant for the user."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is meant for the user."""


# Where each sampling setting makes sense: one table for the config, the command lines and the web page. Outside
# it (or NaN, or infinite) a photo comes out black, or the machine is held for minutes, never a better picture.
SAMPLING_LIMITS = {"steps": (1, 1000), "eta": (0, 5), "min_signal": (0, 0.99), "guidance": (0, 10),
                   "guidance_first": (0, 10), "size": (8, 1024)}
SPACINGS = ("linspace", "trailing")  # see model.timesteps
SAMPLER_NAMES = ("ddim", "dpm++2m", "ddpm")  # model.SAMPLERS


def range_check(value, name, low, high):
    """(ok, message): a finite number from low to high."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
    return ok, f"{name} must be a number from {low} to {high}, not {value}"


def guidance_check(guidance, cond_drop):
    """(ok, message): guidance other than 1 needs the unconditional colours that only cond_drop > 0 trains.
    One check for the config and for a guidance given at sampling time."""
    return guidance == 1 or cond_drop > 0, "guidance other than 1 needs a model trained with cond_drop > 0"


def interval_check(interval, name):
    """(ok, message) for the steps guidance applies at: two signal levels, 0 <= low <= high <= 1."""
    ok = len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1
    return ok, f"{name} must be two signal levels, 0 <= low <= high <= 1"


def _linearize(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (clipped) -> linear sRGB: sRGB's transfer curve undone."""
    rgb = np.clip(rgb, 0, 1, dtype=np.float32)
    return np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def _lab_f(t: np.ndarray) -> np.ndarray:
    """CIELAB's compression of XYZ relative to white: a cube root, linear near black."""
    return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)


def _colour_matrix(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A 3x3 matrix applied to each pixel of (N, 3, H, W): one matrix product."""
    return (m @ x.reshape(*x.shape[:2], -1)).reshape(x.shape)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) RGB in [0, 1] -> normalized LAB (N, 3, H, W), float32."""
    f = _lab_f(_colour_matrix(_RGB2XYZ / _WHITE[:, None], _linearize(rgb)))
    L = 116 * f[:, 1:2] - 16
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return np.concatenate([L / 50 - 1, a / AB_NORM, b / AB_NORM], axis=1)


def lightness(rgb: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) RGB in [0, 1] -> normalized L (N, 1, H, W): rgb_to_lab's first channel alone, a third of its
    work (a photo's full-resolution L is all inference needs of it)."""
    y = np.einsum("j,njhw->nhw", _RGB2XYZ[1], _linearize(rgb))[:, None]  # white's Y is 1
    return (116 * _lab_f(y) - 16) / 50 - 1


# the L of each 8-bit grey level (R = G = B), for greyscale photos: a table lookup instead of arithmetic
GREY_LIGHTNESS = lightness(np.broadcast_to(np.linspace(0, 1, 256, dtype=np.float32), (1, 3, 1, 256)))[0, 0, 0]


def _lab_to_xyz(lab: np.ndarray) -> np.ndarray:
    """Normalized LAB -> XYZ relative to the white point (not yet scaled by it), unclipped."""
    lab = np.asarray(lab, np.float32)
    fy = lab[:, 0:1] * (50 / 116) + 66 / 116  # (L + 16) / 116, L = (L_n + 1) * 50
    f = np.concatenate([fy + lab[:, 1:2] * (AB_NORM / 500), fy, fy - lab[:, 2:3] * (AB_NORM / 200)], axis=1)
    return np.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787)


def _encode(lin: np.ndarray) -> np.ndarray:
    """Linear sRGB -> RGB in [0, 1] (sRGB's transfer curve), clipped."""
    lin = np.maximum(lin, 0)
    return np.clip(np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin), 0, 1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Normalized LAB (N, 3, H, W) -> RGB in [0, 1] (out-of-gamut colours are clipped)."""
    return _encode(_colour_matrix(_XYZ2RGB, np.maximum(_lab_to_xyz(lab), 0)))


def _lab_to_linear(lab: np.ndarray) -> np.ndarray:
    """Normalized LAB -> linear sRGB, unclipped: a channel outside [0, 1] means out of gamut."""
    return _colour_matrix(_XYZ2RGB, _lab_to_xyz(lab))


def _in_gamut(lin: np.ndarray, axis: int, tol: float) -> np.ndarray:
    """Whether each pixel's linear sRGB (channels along `axis`) lies in [0, 1], to within tol."""
    return (lin.min(axis=axis) >= -tol) & (lin.max(axis=axis) <= 1 + tol)


def _gamut_fit(lab: np.ndarray, iters: int, tol: float):
    """(fit_to_gamut(lab), its linear sRGB)."""
    lab = np.asarray(lab, np.float32)
    lin = _lab_to_linear(lab)
    bad = ~_in_gamut(lin, 1, tol)  # (N, H, W)
    if not bad.any():
        return lab, lin
    lab, lin = lab.copy(), lin.copy()
    n, h, w = np.nonzero(bad)
    pix = lab[n, :, h, w].T[None, :, :, None]  # (1, 3, P, 1): each trial is one conversion of the bad pixels
    lo, hi = np.zeros(pix.shape[2], np.float32), np.ones(pix.shape[2], np.float32)
    for _ in range(iters):
        mid = (lo + hi) / 2
        trial = np.concatenate([pix[:, :1], pix[:, 1:] * mid[:, None]], axis=1)
        ok = _in_gamut(_lab_to_linear(trial)[0, :, :, 0], 0, tol)
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    fitted = np.concatenate([pix[:, :1], pix[:, 1:] * lo[:, None]], axis=1)
    lab[n, :, h, w] = fitted[0, :, :, 0].T
    lin[n, :, h, w] = _lab_to_linear(fitted)[0, :, :, 0].T
    return lab, lin


def fit_to_gamut(lab: np.ndarray, iters: int = 12, tol: float = 1e-5) -> np.ndarray:
    """Normalized LAB (N, 3, H, W) -> the same with each out-of-sRGB-gamut pixel's chroma scaled down
    (bisection, to 1/2**iters) until it fits, keeping its L and hue. lab_to_rgb's per-channel clipping would
    change the lightness of such pixels instead. Every L in [0, 100] fits at zero chroma."""
    return _gamut_fit(lab, iters, tol)[0]


# sRGB's curve as a table from linear light (16 bits: within 0.05 of a level) to 8-bit: no power per pixel
_SRGB8 = (_encode(np.linspace(0, 1, 65536, dtype=np.float32)) * 255).round().astype(np.uint8)


def lab_to_rgb8(lab: np.ndarray) -> np.ndarray:
    """Normalized LAB (N, 3, H, W) -> 8-bit RGB (N, H, W, 3) uint8 of fit_to_gamut(lab), each pixel converted
    once: a full-resolution photo's output, laid out as PIL wants it."""
    lin = _gamut_fit(lab, 12, 1e-5)[1]
    return _SRGB8[(np.clip(lin, 0, 1) * 65535 + 0.5).astype(np.uint16).transpose(0, 2, 3, 1)]


def pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL image (any mode PIL converts to RGB) -> (1, 3, H, W) float32 in [0, 1]."""
    return (np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


def array_to_pil(rgb: np.ndarray) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] -> PIL RGB image."""
    rgb = np.asarray(rgb).reshape(-1, *rgb.shape[-3:])[0]
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def load_image(path) -> Image.Image:
    """Open, fully decode and EXIF-rotate an image, or raise ImageError with a one-line reason."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            return ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot be decoded ({e})") from None


def is_greyscale(img: Image.Image, tolerance: int = 3) -> bool:
    """True if a photo has no colour: a greyscale mode, or RGB whose channels never differ by more than
    `tolerance` levels (greyscale JPEGs saved as RGB carry a little chroma noise)."""
    if img.mode in ("1", "L", "LA", "La", "I", "F") or img.mode.startswith("I;16"):
        return True
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return bool(np.percentile(spread, 99) <= tolerance)


def list_images(folder):
    """The image files of a folder (by extension), sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                  and os.path.isfile(os.path.join(folder, f)))


def save_image(img: Image.Image, path, **params) -> None:
    """Save with the format chosen by the extension; written to a temporary file then renamed.
    `params` go to PIL's save (e.g. quality=95, or save_all=True for an animation)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ImageError(f"{path}: unknown image extension '{ext}'")
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # JPEG has no alpha
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    try:
        img.save(tmp, format=fmt, **params)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ImageError(f"{path}: cannot write ({e.strerror or e})") from None


def pick_device(name: str = "auto"):
    """The torch.device to run on: "auto" is CUDA where there is a GPU."""
    import torch  # here, not at the top: the default command colorizes without PyTorch (inference.py)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def may_have_gpu() -> bool:
    """False where CUDA_VISIBLE_DEVICES hides every GPU or no GPU driver is loaded (NVIDIA's, AMD's, WSL's): there
    torch.cuda finds no GPU, and the command need not import PyTorch to ask."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/kfd", "/dev/dxg"))


def use_bf16(device, amp="auto") -> bool:
    """Whether to compute in bf16 autocast: "on"/"off" (or True/False) as asked; "auto" (or None) where fast."""
    return bf16_is_fast(device) if amp in ("auto", None) else amp in ("on", True)


def bf16_is_fast(device) -> bool:
    """bf16 autocast pays on CUDA and on CPUs with native bf16: about 2x for training here. Elsewhere the CPU
    emulates bf16 and it is slower than float32."""
    return device.type == "cuda" or cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def folder_weight(spec: str):
    """"photos:0.4" -> ("photos", 0.4); a folder without a weight weighs 1 (the suffix counts only if it is a
    number, so a path with a colon in it stays whole)."""
    path, _, weight = spec.rpartition(":")
    try:
        return (path, float(weight)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, except that a bad flag is one line, like every other error here, not usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def comma_separated(kind):
    """An argparse type: "0.5,0.9" -> (0.5, 0.9), each item converted by `kind` (int, float)."""
    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, not {text!r}") from None
    return parse
