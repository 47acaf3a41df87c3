"""Colour hints: the RGBA hint file, its scaling to the model, and the command line's --hints."""
import numpy as np
import pytest
import torch
from PIL import Image

import inference
import train
from conftest import TINY_MODEL, open_image, seeded_sample
from model import ColorDiffusion, Config, random_hints, spread_hints
from utils import ImageError, rgb_to_lab

HINTED = Config(**TINY_MODEL, hints=True)
COLOUR = (60, 150, 90)  # a mid green, inside sRGB at any lightness near its own


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {"hinted": tiny_checkpoint(hints=True), "plain": tiny_checkpoint()}


def hint_file(path, size, spots):
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    for x, y in spots:
        img.putpixel((x, y), (*COLOUR, 255))
    img.save(path)
    return path


def ab_of(rgb):
    return rgb_to_lab(np.array(rgb, np.float32).reshape(1, 3, 1, 1) / 255)[0, 1:, 0, 0]


def test_load_hints_reads_opaque_pixels_and_scales_to_the_photo(tmp_path):
    path = hint_file(tmp_path / "h.png", (10, 8), [(3, 2)])
    hints = inference.load_hints(str(path), (20, 16))  # twice the size: the hint covers 2x2 photo pixels
    assert hints.shape == (1, 3, 16, 20)
    assert hints[0, 2].sum() == 4 and hints[0, 2, 4:6, 6:8].all()
    assert np.allclose(hints[0, :2, 4, 6], ab_of(COLOUR), atol=1e-5)
    assert np.abs(hints[0, :2][:, hints[0, 2] == 0]).max() == 0
    small = inference.model_hints(hints, 8, 10)  # the model's resolution: a mean over what each pixel covers
    assert small[0, 2].sum() == 1 and np.allclose(small[0, :2, 2, 3], ab_of(COLOUR), atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda p: Image.new("RGB", (8, 8), COLOUR).save(p), "need transparency"),
    (lambda p: Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(p), "no hints"),
    (lambda p: p.write_text("not an image"), "not an image"),
])
def test_bad_hint_files_are_one_line_errors(make, message, tmp_path, ckpts, capsys):
    Image.new("L", (20, 16), 128).save(tmp_path / "g.png")
    make(tmp_path / "h.png")
    code = inference.main(["--image-path", str(tmp_path / "g.png"), "--hints", str(tmp_path / "h.png"),
                           "--output", str(tmp_path / "o.png"), "--checkpoint", ckpts["hinted"]])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(ImageError):
        inference.load_hints(str(tmp_path / "h.png"), (20, 16))


def test_hinted_pixels_take_the_hinted_colour(tmp_path, ckpts, capsys):
    Image.new("RGB", (20, 16), COLOUR).convert("L").save(tmp_path / "g.png")
    hint_file(tmp_path / "h.png", (20, 16), [(5, 5), (14, 9)])
    args = ["--image-path", str(tmp_path / "g.png"), "--steps", "3", "--seed", "0"]
    assert inference.main(args + ["--hints", str(tmp_path / "h.png"), "--output", str(tmp_path / "o.png"),
                                  "--checkpoint", ckpts["hinted"]]) == 0
    out = np.asarray(open_image(tmp_path / "o.png").convert("RGB"))
    for x, y in [(5, 5), (14, 9)]:  # the hint's colour (ab) at the photo's own lightness
        assert np.abs(ab_of(out[y, x]) - ab_of(COLOUR)).max() * 110 < 2, out[y, x]
    assert np.abs(ab_of(out[0, 0]) - ab_of(COLOUR)).max() * 110 > 2  # a random model: elsewhere, other colours
    # a model without hint inputs takes them too: pinned and spread by the sampler
    assert inference.main(args + ["--hints", str(tmp_path / "h.png"), "--output", str(tmp_path / "p.png"),
                                  "--checkpoint", ckpts["plain"]]) == 0
    out = np.asarray(open_image(tmp_path / "p.png").convert("RGB"))
    assert all(np.abs(ab_of(out[y, x]) - ab_of(COLOUR)).max() * 110 < 2 for x, y in [(5, 5), (14, 9)])
    code = inference.main(["--image-path", str(tmp_path), "--hints", str(tmp_path / "h.png"),
                           "--checkpoint", ckpts["hinted"]])
    assert code == 1 and "single image" in capsys.readouterr().err


def test_sampling_moves_hinted_pixels_to_their_colour_at_every_step():
    """Training-free, as in RePaint: the model's x0 at hinted pixels is replaced by the hint at each step, so the
    sample there is the hinted colour and each x_t carries it for the model to see."""
    torch.manual_seed(0)
    model = ColorDiffusion(HINTED).eval()
    L = torch.rand(2, 1, 16, 16) * 2 - 1
    hints = torch.zeros(2, 3, 16, 16)
    hints[:, :2, 4:6, 7:9], hints[:, 2, 4:6, 7:9] = 0.3, 1
    seen = []
    ab = model.sample(L, steps=4, hints=hints, generator=torch.Generator().manual_seed(0),
                      callback=lambda i, n, x, x0: seen.append(x0))
    assert torch.allclose(ab[:, :, 4:6, 7:9], torch.full((2, 2, 2, 2), 0.3), atol=1e-5)
    assert all(torch.allclose(x0[:, :, 4:6, 7:9] / HINTED.ab_scale, torch.full((2, 2, 2, 2), 0.3)) for x0 in seen)
    free = model.sample(L, steps=4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(free[:, :, 4:6, 7:9], ab[:, :, 4:6, 7:9])


def test_a_hint_spreads_over_its_region_and_stops_at_edges():
    """Left half dark, right half light; one hint on the right: the right half moves to its colour, most near it,
    the left half (another grey: another region) barely moves, nor does a far corner of the right."""
    L = torch.full((1, 1, 32, 32), -0.6)
    L[..., 16:] = 0.4
    x0, ab, mask = torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32), torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    ab[:, :, 15:17, 20:22], mask[:, :, 15:17, 20:22] = 0.5, True
    out = spread_hints(x0, L, ab, mask)
    assert torch.equal(out[mask.expand_as(out)], ab[mask.expand_as(ab)])
    near, edge, far = out[0, 0, 16, 24].item(), out[0, 0, 16, 15].item(), out[0, 0, 0, 31].item()
    assert near > 0.35 and far < near / 2 and abs(edge) < 0.01
    assert torch.equal(spread_hints(x0, L, ab, torch.zeros_like(mask)), x0)  # no hints: nothing moves


# ---------------------------------------------------------------------------------------------------------
# hints inside the model

def test_hint_inputs_start_at_zero_and_then_steer_the_prediction(tiny_config):
    """A model given hint inputs by --init computes exactly what it did (zero-initialised channels); once those
    weights move, hints change its prediction, and random_hints shows true colours under a mask."""
    torch.manual_seed(0)
    old = ColorDiffusion(tiny_config).eval()
    hinted = ColorDiffusion(Config(**{**tiny_config.to_dict(), "hints": True})).eval()
    hinted.load_state_dict(train.add_inputs(dict(old.state_dict()), hinted))
    L, x = torch.rand(2, 1, 16, 16) * 2 - 1, torch.randn(2, 2, 16, 16)
    ab = torch.rand(2, 2, 16, 16) - 0.5
    torch.manual_seed(1)
    hints = random_hints(ab, p_none=0)
    mask = hints[:, 2:] > 0
    assert mask.any() and ((hints[:, :2] - ab).abs() * mask).max() < 1.0  # patch means of the truth
    assert (hints[:, :2] * ~mask).abs().max() == 0

    def eps(m, *extra):  # the UNet's prediction at t = 10 from the inputs training gives it: L, x_t[, hints]
        return m.unet(torch.cat([L, x, *extra], 1), torch.full((2,), 10), m.encoder(L))

    with torch.no_grad():
        assert torch.equal(eps(hinted, hints), eps(old))
        assert torch.equal(hinted.denoiser(L)(x, 10), old.denoiser(L)(x, 10))  # sampling: zero hint inputs
        hinted.unet.init_conv.weight.add_(0.1)
        assert not torch.allclose(eps(hinted, hints), eps(hinted, torch.zeros_like(hints)))


def test_sampling_pins_and_spreads_hints_without_the_trained_hint_inputs(tiny_config):
    """sample() moves x0 to the hints itself and leaves the UNet's hint inputs at zero (at a few steps they
    pulled the rest of a hinted region away from its hint): what those inputs' weights are does not matter."""
    torch.manual_seed(0)
    m = ColorDiffusion(Config(**{**tiny_config.to_dict(), "hints": True})).eval()
    L = torch.rand(1, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    hints = random_hints(torch.rand(1, 2, 16, 16) - 0.5, p_none=0)
    hinted = seeded_sample(m, L, 0, steps=3, hints=hints)
    mask = (hints[:, 2:] > 0).expand(-1, 2, -1, -1)
    assert torch.allclose(hinted[mask], hints[:, :2][mask], atol=1e-5)
    assert not torch.allclose(hinted, seeded_sample(m, L, 0, steps=3))
    with torch.no_grad():
        m.unet.init_conv.weight[:, 3:].add_(0.5)  # the hint channels: L, x_t (2), then hints (3)
    assert torch.equal(seeded_sample(m, L, 0, steps=3, hints=hints), hinted)
