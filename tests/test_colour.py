"""Colour conversion and image helpers (utils.py)."""

import numpy as np
import pytest
from PIL import Image

import utils
from conftest import synthetic_photo


# ---------------------------------------------------------------------------------------------------------
# LAB conversion

def random_rgb(seed=0, n=4, size=32):
    rgb = np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)
    rgb[0, :, 0, 0], rgb[0, :, 0, 1] = 0.0, 1.0  # black and white, the ends of the L range
    return rgb


def test_lab_round_trip_is_exact_to_float_error():
    rgb = random_rgb()
    back = utils.lab_to_rgb(utils.rgb_to_lab(rgb))
    assert back.shape == rgb.shape and back.dtype == np.float32
    assert np.abs(back - rgb).max() < 1e-4  # measured about 5e-6 in float32


def test_rgb_to_lab_agrees_with_scikit_image():
    from skimage.color import rgb2lab
    rgb = random_rgb(1)
    ours = utils.rgb_to_lab(rgb).astype(np.float64)
    ref = rgb2lab(rgb.transpose(0, 2, 3, 1).astype(np.float64)).transpose(0, 3, 1, 2)
    ref = np.concatenate([ref[:, :1] / 50 - 1, ref[:, 1:] / utils.AB_NORM], axis=1)
    # normalized units: 1e-4 is 0.005 L levels / 0.011 ab units, far below a visible difference
    assert np.abs(ours - ref).max() < 1e-4
    # and the normalization really maps the L range onto [-1, 1]
    assert ours[0, 0, 0, 0] == pytest.approx(-1, abs=1e-5)
    assert ours[0, 0, 0, 1] == pytest.approx(1, abs=1e-5)
    assert np.abs(utils.lightness(rgb) - ours[:, :1]).max() < 1e-5  # lightness: the same L, alone


def test_fit_to_gamut_keeps_lightness_and_hue_and_only_shrinks_chroma():
    rng = np.random.default_rng(2)
    lab = np.concatenate([rng.random((1, 1, 16, 16), dtype=np.float32) * 1.8 - 0.9,  # ab up to +-110: mostly
                          rng.random((1, 2, 16, 16), dtype=np.float32) * 2 - 1], axis=1)  # outside sRGB
    fitted = utils.fit_to_gamut(lab)
    assert np.array_equal(fitted[:, 0], lab[:, 0])  # L untouched
    scale = np.linalg.norm(fitted[:, 1:], axis=1) / np.linalg.norm(lab[:, 1:], axis=1)
    assert scale.max() <= 1 + 1e-6 and scale.min() < 0.5  # chroma only shrinks, and really had to here
    cross = fitted[:, 1] * lab[:, 2] - fitted[:, 2] * lab[:, 1]  # same direction in the ab plane: the hue
    assert np.abs(cross).max() < 1e-5 and (fitted[:, 1:] * lab[:, 1:]).sum(axis=1).min() >= 0
    rgb = utils.lab_to_rgb(fitted)  # in gamut now: lab_to_rgb's clipping no longer changes anything
    assert np.abs(utils.rgb_to_lab(rgb) - fitted).max() < 2e-3
    # and no more than it had to: 1% more chroma takes each fitted pixel out of gamut again
    moved = scale < 1 - 1e-6
    wider = np.concatenate([fitted[:, :1], fitted[:, 1:] * 1.01], axis=1)
    chroma = lambda lab: np.linalg.norm(lab[:, 1:], axis=1)  # noqa: E731
    shrunk = chroma(utils.fit_to_gamut(wider)) < chroma(wider) * (1 - 1e-6)
    assert moved.sum() > 50 and shrunk[moved].all()
    inside = np.array([0.2, 0.1, 0.05], np.float32).reshape(1, 3, 1, 1)
    assert np.array_equal(utils.fit_to_gamut(inside), inside)


def test_is_greyscale():
    rng = np.random.default_rng(0)
    colour = synthetic_photo(rng)
    assert not utils.is_greyscale(colour)
    grey = colour.convert("L")
    assert utils.is_greyscale(grey) and utils.is_greyscale(grey.convert("LA"))
    assert utils.is_greyscale(grey.convert("RGB"))
    arr = np.asarray(grey.convert("RGB")).astype(np.int16)
    noisy = (arr + rng.integers(-1, 2, arr.shape)).clip(0, 255).astype(np.uint8)  # JPEG-like chroma noise
    assert utils.is_greyscale(Image.fromarray(noisy))
    patched = np.asarray(grey.convert("RGB")).copy()
    patched[:10, :10] = (200, 40, 40)  # a red patch on 5% of a grey picture is colour
    assert not utils.is_greyscale(Image.fromarray(patched))
