"""Full resolution: the size the model colours a photo at, the greyscale it sees, and its colours recombined
with the photo's own L at the photo's size."""
import numpy as np
import pytest
import torch
from PIL import Image

import inference
import utils
from model import load_model
from test_inference import lightness, photo


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint()


def test_model_size_is_the_checkpoints_sample_size_unless_given(ckpt):
    model = load_model(ckpt)
    assert inference.model_size(model, 40, 20) == (32, 16)  # sample_size 0: the training size, 16
    assert inference.model_size(model, 40, 20, size=24) == (48, 24)
    model.config.sample_size = 32
    assert inference.model_size(model, 40, 20) == (64, 32)
    assert inference.model_input(model, photo(20, 40)).shape == (1, 1, 64, 32)
    # the flag reaches the sampler's resolution: a bigger --size colours finer detail, so outputs differ
    a = inference.colorize(model, photo(20, 40), steps=2, seed=0)[0]
    b = inference.colorize(model, photo(20, 40), steps=2, seed=0, size=16)[0]
    assert a.size == b.size == (20, 40) and not np.array_equal(np.asarray(a), np.asarray(b))


def test_model_resolution_keeps_aspect_within_limits():
    assert inference.model_resolution(218, 178, 64) == (80, 64)
    assert inference.model_resolution(16, 16, 64) == (64, 64)
    h, w = inference.model_resolution(10, 5000, 64)  # a strip: the long side is capped
    assert w == 256 and h == 8


def test_recombine_in_strips_matches_one_piece(monkeypatch):
    img = photo(37, 41, mode="RGBA")
    ab = np.random.default_rng(0).standard_normal((1, 2, 16, 16), dtype=np.float32) * 0.5  # partly out of gamut
    whole = np.asarray(inference.recombine(img, ab)[0])
    monkeypatch.setattr(inference, "STRIP_PIXELS", 100)  # strips of 2 rows
    strips = np.asarray(inference.recombine(img, ab)[0])
    # several samples at once (the input's L computed once) equal one call per sample
    two = inference.recombine(img, np.concatenate([ab, -ab]))
    assert np.array_equal(np.asarray(two[0]), strips)
    assert np.array_equal(np.asarray(two[1]), np.asarray(inference.recombine(img, -ab)[0]))
    assert whole.shape == (41, 37, 4)
    assert np.array_equal(whole, strips)  # per-pixel maths: strips change nothing
    assert np.abs(lightness(Image.fromarray(strips).convert("RGB")) - lightness(img)).max() < 1.0


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "I;16"])
def test_the_fast_paths_see_what_the_exact_ones_do(ckpt, mode):
    """8-bit greys take their L from a table and are resized by PIL before anything is converted at full size:
    the same L, and within a few thousandths the same model input, as converting every pixel."""
    img = photo(301, 203, mode="RGB").convert(mode) if mode != "I;16" else \
        Image.fromarray(np.asarray(photo(301, 203)).astype(np.uint16) * 257)
    L, alpha = inference.full_lightness(img)
    rgb, _ = inference.greyscale_rgb(img)
    assert L.shape == (1, 1, 203, 301) and (alpha is not None) == (mode == "LA")
    assert np.abs(L - utils.rgb_to_lab(rgb)[:, :1]).max() < 1e-5
    model = load_model(ckpt)
    h, w = inference.model_size(model, 203, 301)
    small = torch.nn.functional.interpolate(torch.from_numpy(rgb.copy()), (h, w), mode="bicubic", antialias=True)
    exact = utils.rgb_to_lab(small.clamp(0, 1).numpy())[:, :1]
    assert np.abs(inference.model_input(model, img) - exact).max() < 0.01  # a fiftieth of a grey level's L


def test_rgb8_is_the_fitted_colour_rounded():
    lab = utils.rgb_to_lab(np.random.default_rng(0).random((2, 3, 20, 30), dtype=np.float32))
    lab[:, 1:] *= 2.5  # partly out of gamut
    expected = (utils.lab_to_rgb(utils.fit_to_gamut(lab)) * 255).round().transpose(0, 2, 3, 1)
    assert np.abs(utils.lab_to_rgb8(lab) - expected).max() <= 1
    assert np.abs(utils.lab_to_rgb8(lab) - expected).mean() < 0.01
