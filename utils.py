"""Colour conversion, image I/O and device choice: the bottom layer, no model code here.

Model-space LAB ("normalized LAB") is used everywhere above this file:
    L_n  = L / 50 - 1        L  in [0, 100]      -> L_n  in [-1, 1]
    ab_n = ab / 110          ab in about +-110   -> ab_n in about [-1, 1]   (the original's scaling)
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

AB_NORM = 110.0
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}

# sRGB D65 matrices and white point, the same constants scikit-image uses, so both agree to float error.
_RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
_XYZ2RGB = torch.linalg.inv(_RGB2XYZ)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


class ImageError(Exception):
    """A file that cannot be used as an image; the message is meant for the user."""


def _linearize(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (clipped) -> linear sRGB: sRGB's transfer curve undone."""
    rgb = rgb.float().clamp(0, 1)
    return torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    """CIELAB's compression of XYZ relative to white: a cube root, linear near black."""
    return torch.where(t > 0.008856, t.clamp(min=1e-12) ** (1 / 3), 7.787 * t + 16 / 116)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> normalized LAB (N, 3, H, W)."""
    xyz = torch.einsum("ij,njhw->nihw", _RGB2XYZ.to(rgb.device), _linearize(rgb))
    f = _lab_f(xyz / _WHITE.to(rgb.device).view(1, 3, 1, 1))
    L = 116 * f[:, 1:2] - 16
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([L / 50 - 1, a / AB_NORM, b / AB_NORM], dim=1)


def lightness(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> normalized L (N, 1, H, W): rgb_to_lab's first channel alone, a third of its
    work (a photo's full-resolution L is all inference needs of it)."""
    y = torch.einsum("j,njhw->nhw", _RGB2XYZ[1].to(rgb.device), _linearize(rgb))[:, None]  # white's Y is 1
    return (116 * _lab_f(y) - 16) / 50 - 1


# the L of each 8-bit grey level (R = G = B), for greyscale photos: a table lookup instead of arithmetic
GREY_LIGHTNESS = lightness(torch.linspace(0, 1, 256).view(1, 1, 1, 256).expand(1, 3, 1, 256))[0, 0, 0].numpy()


def _lab_to_xyz(lab: torch.Tensor) -> torch.Tensor:
    """Normalized LAB -> XYZ relative to the white point (not yet scaled by it), unclipped."""
    lab = lab.float()
    fy = lab[:, 0:1] * (50 / 116) + 66 / 116  # (L + 16) / 116, L = (L_n + 1) * 50
    f = torch.cat([fy + lab[:, 1:2] * (AB_NORM / 500), fy, fy - lab[:, 2:3] * (AB_NORM / 200)], dim=1)
    # few full-size temporaries: at a scan's size, allocating them costs more than the arithmetic
    return torch.where(f > 0.2068966, f.pow(3), f.sub(16 / 116).div_(7.787))


def _colour_matrix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 3x3 matrix applied to each pixel of (N, 3, H, W): one matrix product."""
    return (m.to(x.device) @ x.flatten(2)).view_as(x)


def _encode(lin: torch.Tensor) -> torch.Tensor:
    """Linear sRGB -> RGB in [0, 1] (sRGB's transfer curve), clipped."""
    lin = lin.clamp(min=0)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Normalized LAB (N, 3, H, W) -> RGB in [0, 1] (out-of-gamut colours are clipped)."""
    return _encode(_colour_matrix(_XYZ2RGB * _WHITE, _lab_to_xyz(lab).clamp(min=0)))


def _lab_to_linear(lab: torch.Tensor) -> torch.Tensor:
    """Normalized LAB -> linear sRGB, unclipped: a channel outside [0, 1] means out of gamut."""
    return _colour_matrix(_XYZ2RGB * _WHITE, _lab_to_xyz(lab))


def _in_gamut(lin: torch.Tensor, dim: int, tol: float) -> torch.Tensor:
    """Whether each pixel's linear sRGB (channels along `dim`) lies in [0, 1], to within tol."""
    low, high = torch.aminmax(lin, dim=dim)
    return (low >= -tol) & (high <= 1 + tol)


def _gamut_fit(lab: torch.Tensor, iters: int, tol: float):
    """(fit_to_gamut(lab), its linear sRGB)."""
    lab = lab.float()
    lin = _lab_to_linear(lab)
    bad = ~_in_gamut(lin, 1, tol)  # (N, H, W)
    if not bad.any():
        return lab, lin
    lab, lin = lab.clone(), lin.clone()
    pix = lab.transpose(0, 1)[:, bad]  # (3, P): channels first, so each trial is one contiguous conversion
    lo, hi = torch.zeros(pix.shape[1], device=lab.device), torch.ones(pix.shape[1], device=lab.device)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = _in_gamut(_lab_to_linear(torch.cat([pix[:1], pix[1:] * mid])[None, :, :, None])[0, :, :, 0], 0, tol)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    fitted = torch.cat([pix[:1], pix[1:] * lo])[None, :, :, None]
    lab.transpose(0, 1)[:, bad] = fitted[0, :, :, 0]
    lin.transpose(0, 1)[:, bad] = _lab_to_linear(fitted)[0, :, :, 0]
    return lab, lin


def fit_to_gamut(lab: torch.Tensor, iters: int = 12, tol: float = 1e-5) -> torch.Tensor:
    """Normalized LAB (N, 3, H, W) -> the same with each out-of-sRGB-gamut pixel's chroma scaled down
    (bisection, to 1/2**iters) until it fits, keeping its L and hue. lab_to_rgb's per-channel clipping would
    change the lightness of such pixels instead. Every L in [0, 100] fits at zero chroma."""
    return _gamut_fit(lab, iters, tol)[0]


# sRGB's curve as a table from linear light (16 bits: within 0.05 of a level) to 8-bit: no power per pixel
_SRGB8 = (_encode(torch.linspace(0, 1, 65536)) * 255).round().byte().numpy()


def lab_to_rgb8(lab: torch.Tensor) -> np.ndarray:
    """Normalized LAB (N, 3, H, W) -> 8-bit RGB (N, H, W, 3) uint8 of fit_to_gamut(lab), each pixel converted
    once: a full-resolution photo's output, laid out as PIL wants it. The table is read by numpy with 16-bit
    indices: 4x faster than torch's 64-bit gather, the slowest step of a scan's conversion."""
    lin = _gamut_fit(lab, 12, 1e-5)[1].cpu()
    index = lin.clamp(0, 1).mul_(65535).add_(0.5).permute(0, 2, 3, 1).numpy().astype(np.uint16)
    return _SRGB8[index]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode PIL converts to RGB) -> (1, 3, H, W) float in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(rgb: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] -> PIL RGB image."""
    rgb = rgb.reshape(-1, *rgb.shape[-3:])[0]
    arr = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def use_bf16(device: torch.device, amp="auto") -> bool:
    """Whether to compute in bf16 autocast: "on"/"off" (or True/False) as asked; "auto" (or None) where fast."""
    return bf16_is_fast(device) if amp in ("auto", None) else amp in ("on", True)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX): about 2x for training
    here. Elsewhere the CPU emulates bf16 and it is slower than float32."""
    if device.type == "cuda":
        return True
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
