"""inference.py: the colorize API and the command line.

A tiny random-initialised checkpoint (dim 8, 16 px, 20 timesteps) is enough: these tests are about sizes,
lightness, file formats, paths and errors, not colour quality. The command line runs in-process through
inference.main(argv) (conftest's cli; it returns the exit status); two real processes check the exit status, stderr
and stdout. Folders: test_folders.py.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import inference  # noqa: E402
from conftest import TINY_MODEL, assert_same_lightness, lightness, open_image, photo  # noqa: E402
from model import ColorDiffusion, Config, load_model, save_checkpoint  # noqa: E402
from utils import rgb_to_lab  # noqa: E402

TINY = Config(**TINY_MODEL)


def colour_photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.3 * rng.random((h, w))], axis=-1)
    return Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8), "RGB")


def chroma(path):
    lab = rgb_to_lab(np.asarray(open_image(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 255)
    return float(np.abs(lab[0, 1:]).mean() * 110)


# ---------------------------------------------------------------------------------------------------------
# sizes, lightness, formats

@pytest.mark.parametrize("w,h", [(16, 16), (40, 24), (7, 53), (300, 180)])
def test_output_has_input_size_and_lightness(cli, tmp_path, w, h):
    src = tmp_path / "in.png"
    photo(w, h).save(src)
    code, out, err = cli("--image-path", src, "--steps", 5)
    assert code == 0, err
    result = tmp_path / "in_color.png"  # the default: <stem>_color<ext> in the current folder
    assert out.split() == ["in_color.png"]
    assert open_image(result).size == (w, h)
    assert open_image(result).mode == "RGB"
    assert_same_lightness(result, lightness(open_image(src)))
    assert chroma(result) > 0.5  # it is colour, not the greyscale back


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_kept(cli, tmp_path, mode):
    grey = photo(30, 20)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1)), "L")
    img = grey.convert("RGBA" if mode == "RGBA" else "LA")
    img.putalpha(alpha)
    img.save(tmp_path / "a.png")
    code, _, err = cli("--image-path", tmp_path / "a.png", "--steps", 3)
    assert code == 0, err
    out = open_image(tmp_path / "a_color.png")
    assert out.mode == "RGBA" and out.size == (30, 20)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha))
    assert_same_lightness(tmp_path / "a_color.png", lightness(grey))


def test_16bit_palette_cmyk_and_bilevel_inputs(cli, tmp_path):
    y, x = np.mgrid[0:24, 0:32]
    wide = (x * 2000 + y * 50).astype(np.uint16)  # 16-bit over the whole range
    dark = (x * 6 + y).astype(np.uint16)          # 16-bit, but all values below 255: still 16-bit, so near black
    Image.fromarray(wide).save(tmp_path / "wide16.png")
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert open_image(tmp_path / "wide16.png").mode.startswith("I")
    colour = colour_photo(32, 24)
    colour.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(tmp_path / "pal.png")
    colour.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    colour.convert("CMYK").save(tmp_path / "cmyk.tif")
    photo(32, 24).convert("1").save(tmp_path / "bw.png")
    expected = {
        "wide16.png": lightness(wide / 65535.0),
        "dark16.png": lightness(dark / 65535.0),
        # PIL's own conversions define what a palette or CMYK file looks like
        "pal.png": lightness(open_image(tmp_path / "pal.png")),
        "cmyk.jpg": lightness(open_image(tmp_path / "cmyk.jpg").convert("RGB")),
        "cmyk.tif": lightness(open_image(tmp_path / "cmyk.tif").convert("RGB")),
        "bw.png": lightness(open_image(tmp_path / "bw.png")),
    }
    assert open_image(tmp_path / "cmyk.jpg").mode == "CMYK"
    for name, L in expected.items():
        code, _, err = cli("--image-path", tmp_path / name, "--output", tmp_path / f"out_{name}.png", "--steps", 2)
        assert code == 0, (name, err)
        assert open_image(tmp_path / f"out_{name}.png").size == (32, 24)
        assert_same_lightness(tmp_path / f"out_{name}.png", L)
    assert lightness(open_image(tmp_path / "out_dark16.png.png")).max() < 5  # not stretched as if 8-bit


def test_exif_rotated_jpeg_comes_out_as_displayed_with_its_exif(cli, tmp_path):
    img = photo(40, 24)  # stored 40 wide; EXIF orientation 6 displays it rotated, 24 wide and 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0132] = "1931:05:04 10:00:00"  # DateTime
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = ImageOps.exif_transpose(open_image(tmp_path / "rot.jpg"))
    assert shown.size == (24, 40)
    for out in ("rot_out.png", "rot_out.jpg", "rot_out.webp", "rot_out.tif"):
        code, _, err = cli("--image-path", tmp_path / "rot.jpg", "--output", tmp_path / out, "--steps", 2)
        assert code == 0, err
        result = open_image(tmp_path / out)
        assert result.size == (24, 40)
        # the photo's EXIF goes along, without the orientation that was already applied
        assert result.getexif().get(0x0132) == "1931:05:04 10:00:00", out
        assert result.getexif().get(0x0112, 1) == 1, out
    assert_same_lightness(tmp_path / "rot_out.png", lightness(shown))


def test_colour_photo_is_noted_and_keeps_its_lightness(cli, tmp_path):
    colour_photo(24, 30).save(tmp_path / "c.png")
    code, _, err = cli("--image-path", tmp_path / "c.png", "--output", tmp_path / "c.tif", "--steps", 2)
    assert code == 0, err
    assert len([line for line in err.splitlines() if "colour photo" in line]) == 1
    assert open_image(tmp_path / "c.tif").format == "TIFF"  # the format follows the output's extension
    assert_same_lightness(tmp_path / "c.tif", lightness(open_image(tmp_path / "c.png")))
    code, _, err = cli("--image-path", tmp_path / "c.png", "--output", tmp_path / "c.webp", "--steps", 2)
    assert code == 0 and open_image(tmp_path / "c.webp").format == "WEBP"


# ---------------------------------------------------------------------------------------------------------
# samples, seeds, samplers, GIF (folders: test_folders.py)

def test_num_samples_differ_and_seed_is_bit_for_bit(cli, tmp_path):
    photo(24, 20).save(tmp_path / "p.png")
    assert cli("--image-path", tmp_path / "p.png", "--num-samples", 3, "--seed", 7, "--steps", 4)[0] == 0
    samples = [np.asarray(open_image(tmp_path / f"p_color_{k}.png")) for k in range(3)]
    assert not (tmp_path / "p_color.png").exists()
    assert all(s.shape == (20, 24, 3) for s in samples)
    assert not np.array_equal(samples[0], samples[1]) and not np.array_equal(samples[1], samples[2])
    assert cli("--image-path", tmp_path / "p.png", "--output", tmp_path / "again.png", "--num-samples", 3,
               "--seed", 7, "--steps", 4)[0] == 0
    for k in range(3):
        assert np.array_equal(np.asarray(open_image(tmp_path / f"again_{k}.png")), samples[k])
    # stochastic samplers are reproducible too, and another seed differs
    for seed, name in [(3, "s3a.png"), (3, "s3b.png"), (4, "s4.png")]:
        assert cli("--image-path", tmp_path / "p.png", "--output", tmp_path / name, "--seed", seed,
                   "--steps", 4, "--eta", 1, "--dynamic-threshold")[0] == 0
    a, b, c = (np.asarray(open_image(tmp_path / n)) for n in ("s3a.png", "s3b.png", "s4.png"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ddpm_and_gif(cli, tmp_path):
    photo(20, 16).save(tmp_path / "g.png")
    code, _, err = cli("--image-path", tmp_path / "g.png", "--ddpm", "--save-gif", tmp_path / "steps.gif",
                       "--num-samples", 2)
    assert code == 0, err
    with Image.open(tmp_path / "steps.gif") as gif:
        # every DDPM step from where sampling starts, then the result
        assert gif.format == "GIF" and gif.n_frames == len(ColorDiffusion(TINY).sampling_schedule()) + 1
        assert gif.width >= 2 * 256 and gif.height >= 256  # two samples side by side, upscaled
    assert open_image(tmp_path / "g_color_1.png").size == (20, 16)
    code, _, err = cli("--image-path", tmp_path / "g.png", "--ddpm", "--steps", 5)
    assert code == 2 and "--ddpm" in err
    code, _, err = cli("--image-path", tmp_path / "g.png", "--ddpm", "--eta", 0)
    assert code == 2 and "--eta" in err


def test_min_signal_moves_where_sampling_starts(cli, tmp_path):
    """--min-signal overrides the checkpoint's start: 0 runs DDPM over all T steps, a higher level fewer."""
    photo(20, 16).save(tmp_path / "g.png")
    frames = {}
    for s in (0, 0.5):
        gif = tmp_path / f"steps_{s}.gif"
        code, _, err = cli("--image-path", tmp_path / "g.png", "--output", tmp_path / f"g_{s}.png", "--ddpm",
                           "--min-signal", s, "--save-gif", gif)
        assert code == 0, err
        with Image.open(gif) as animation:
            frames[s] = animation.n_frames
    assert frames[0] == TINY.timesteps + 1
    assert frames[0.5] == int((ColorDiffusion(TINY).alphas_cumprod.sqrt() >= 0.5).sum()) + 1 < frames[0]
    for bad in (1, -0.1):
        code, _, err = cli("--image-path", tmp_path / "g.png", "--min-signal", bad)
        assert code == 2 and "--min-signal" in err and "Traceback" not in err


def test_guidance_changes_the_colours_and_defaults_to_the_checkpoints(cli, tmp_path):
    photo(20, 16).save(tmp_path / "g.png")
    out = {}
    for w in (None, 1, 2):
        flags = [] if w is None else ["--guidance", w]
        code, _, err = cli("--image-path", tmp_path / "g.png", "--output", tmp_path / f"g_{w}.png", "--steps", 3,
                           "--seed", 0, *flags)
        assert code == 0, err
        out[w] = (tmp_path / f"g_{w}.png").read_bytes()
    assert TINY.guidance == 1 and out[None] == out[1] != out[2]
    code, _, err = cli("--image-path", tmp_path / "g.png", "--guidance", -1)
    assert code == 2 and "--guidance" in err
    code, _, err = cli("--image-path", tmp_path / "g.png", "--guidance-first", -1)
    assert code == 2 and "--guidance-first must be a number from 0" in err
    for bad in ("0.9,0.1", "0.5", "0,2", "a,b"):
        code, _, err = cli("--image-path", tmp_path / "g.png", "--guidance-interval", bad)
        assert code == 2 and "--guidance-interval" in err and "Traceback" not in err, bad


def test_sampling_flags_default_to_the_checkpoints_and_explicit_zero_is_kept():
    """Unset sampling flags are None: the checkpoint's settings (Config.sampler, sample_steps, ...) apply; an
    explicit --eta 0 (deterministic) is kept, not taken as unset; --ddpm is --sampler ddpm."""
    kwargs = lambda *a: inference._sampler_kwargs(inference.parse_args(["--image-path", "x.png", *a]))  # noqa: E731
    assert all(kwargs()[k] is None for k in ("sampler", "steps", "eta", "min_signal", "guidance", "guidance_first",
                                         "guidance_interval", "antithetic", "spacing"))
    assert kwargs("--guidance-first", "0")["guidance_first"] == 0.0
    assert kwargs("--guidance-interval", "0.5,0.9")["guidance_interval"] == (0.5, 0.9)
    assert kwargs("--antithetic")["antithetic"] is True and kwargs("--no-antithetic")["antithetic"] is False
    assert kwargs("--spacing", "trailing")["spacing"] == "trailing"
    assert kwargs("--eta", "0")["eta"] == 0.0 and kwargs("--eta", "0.5")["eta"] == 0.5
    assert kwargs("--ddpm")["sampler"] == "ddpm" == kwargs("--sampler", "ddpm")["sampler"]


# ---------------------------------------------------------------------------------------------------------
# outputs are never clobbered; errors are one line

def test_overwrite_rules_and_input_is_never_overwritten(cli, tmp_path):
    photo(16, 16).save(tmp_path / "x.png")
    original = (tmp_path / "x.png").read_bytes()
    assert cli("--image-path", tmp_path / "x.png", "--output", tmp_path / "y.png", "--steps", 2)[0] == 0
    first = (tmp_path / "y.png").read_bytes()
    code, _, err = cli("--image-path", tmp_path / "x.png", "--output", tmp_path / "y.png", "--steps", 3)
    assert code == 1 and "--overwrite" in err and (tmp_path / "y.png").read_bytes() == first
    code, _, err = cli("--image-path", tmp_path / "x.png", "--output", tmp_path / "y.png", "--steps", 3,
                       "--seed", 1, "--overwrite")
    assert code == 0 and (tmp_path / "y.png").read_bytes() != first
    for output in ("x.png", tmp_path / "x.png", tmp_path / "." / "x.png"):
        code, _, err = cli("--image-path", tmp_path / "x.png", "--output", output, "--overwrite")
        assert code == 1 and "input" in err
    (tmp_path / "link.png").symlink_to(tmp_path / "x.png")
    assert cli("--image-path", tmp_path / "x.png", "--output", tmp_path / "link.png", "--overwrite")[0] == 1
    assert (tmp_path / "x.png").read_bytes() == original


def test_bad_inputs_give_one_error_line(cli, tmp_path, ckpt):
    photo(16, 16).save(tmp_path / "ok.png")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "zero.png").write_bytes(b"")
    photo(64, 64).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    unguided = Config(**{**TINY.to_dict(), "cond_drop": 0.0})  # never trained without L: cannot be guided
    save_checkpoint(str(tmp_path / "unguided.pt"),
                    {"config": unguided.to_dict(), "ema": ColorDiffusion(unguided).state_dict()})
    ok = tmp_path / "ok.png"
    cases = [
        (["--image-path", tmp_path / "missing.png"], ckpt, "missing.png"),
        (["--image-path", tmp_path / "text.jpg"], ckpt, "not an image"),
        (["--image-path", tmp_path / "zero.png"], ckpt, "empty"),
        (["--image-path", tmp_path / "cut.jpg"], ckpt, "cut.jpg"),
        (["--image-path", ok, "--output", tmp_path / "afile" / "out.png"], ckpt, "afile"),
        (["--image-path", ok, "--output", tmp_path / "out.xyz"], ckpt, ".xyz"),
        (["--image-path", ok, "--save-gif", tmp_path / "anim.png"], ckpt, ".gif"),
        (["--image-path", ok], str(tmp_path / "bad.pt"), "bad.pt"),
        (["--image-path", ok], str(tmp_path / "nope.pt"), "nope.pt"),
        (["--image-path", ok, "--device", "nonsense"], ckpt, "nonsense"),
        (["--image-path", ok, "--guidance", "2"], str(tmp_path / "unguided.pt"), "cond_drop"),
        (["--image-path", ok, "--guidance-first", "2"], str(tmp_path / "unguided.pt"), "cond_drop"),
        (["--image-path", ok, "--size", "4"], ckpt, "--size"),
        # not numbers, or absurd ones: each would otherwise write a black photo, or hold the machine
        (["--image-path", ok, "--guidance", "nan"], ckpt, "--guidance must be"),
        (["--image-path", ok, "--guidance", "inf"], ckpt, "--guidance must be"),
        (["--image-path", ok, "--guidance-first", "nan"], ckpt, "--guidance-first must be"),
        (["--image-path", ok, "--eta", "nan"], ckpt, "--eta must be"),
        (["--image-path", ok, "--eta", "inf"], ckpt, "--eta must be"),
        (["--image-path", ok, "--min-signal", "nan"], ckpt, "--min-signal must be"),
        (["--image-path", ok, "--guidance-interval", "0,nan"], ckpt, "--guidance-interval"),
        (["--image-path", ok, "--size", "100000"], ckpt, "--size must be"),
        (["--image-path", ok, "--steps", "100000"], ckpt, "--steps must be"),
        (["--image-path", ok, "--num-samples", "500"], ckpt, "--num-samples must be"),
    ]
    for args, checkpoint, needle in cases:
        code, out, err = cli(*args, checkpoint=checkpoint)
        assert code != 0, args
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    assert not list(tmp_path.glob("*_color*"))


def test_a_student_refuses_another_guidance(cli, tmp_path):
    """A progressive student learned its teacher's scale only: --guidance would change nothing, so it is refused
    with the way to a model that guides, before anything is written."""
    photo(16, 16).save(tmp_path / "g.png")
    student = os.path.join(ROOT, "checkpoints", "photos64_distilled.pt")
    for flag in ("--guidance", "--guidance-first"):
        code, _, err = cli("--image-path", tmp_path / "g.png", flag, 2, checkpoint=student)
        assert code == 1 and "student" in err and "--teacher" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*_color*"))


def test_errors_in_a_real_process(tmp_path):
    """A real process: exit status 1, one line on stderr, no traceback, nothing written."""
    photo(16, 16).save(tmp_path / "ok.png")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cmd = [sys.executable, os.path.join(ROOT, "inference.py"), "--image-path", str(tmp_path / "ok.png"),
           "--checkpoint", str(tmp_path / "bad.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and "bad.pt" in r.stderr
    assert not (tmp_path / "ok_color.png").exists()


def test_a_real_process_ends_with_its_output_whole_and_reported(tmp_path, ckpt):
    """The command skips the interpreter's teardown (os._exit): its status, its output file and what it printed
    on stdout (a pipe: block-buffered) and stderr all arrive."""
    photo(24, 20).save(tmp_path / "ok.png")
    cmd = [sys.executable, os.path.join(ROOT, "inference.py"), "--image-path", "ok.png", "--checkpoint", ckpt,
           "--steps", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in a pipe
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(env, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ok_color.png"] and "colorized ok.png" in r.stderr
    assert open_image(tmp_path / "ok_color.png").size == (24, 20)


# ---------------------------------------------------------------------------------------------------------
# the Python API

def test_colorize_batch_groups_by_size_and_keeps_order(ckpt):
    model = load_model(ckpt)
    images = [photo(20, 24, 1), photo(33, 17, 2), photo(20, 24, 3), colour_photo(16, 16)]
    results = inference.colorize_batch(model, images, steps=3, num_samples=2, seed=0, batch_size=3, eta=1.0)
    assert [len(r) for r in results] == [2, 2, 2, 2]
    assert [r[0].size for r in results] == [img.size for img in images]
    for img, (out, _) in zip(images, results):
        diff = np.abs(lightness(out) - lightness(img))
        assert diff.max() < 1.0
    single = inference.colorize(model, images[1], steps=3, seed=0)
    assert len(single) == 1 and single[0].size == (33, 17)
    # a photo's noise is its own (sample k: seed + k): alone it gets the colours it got batched with another
    alone = [np.asarray(inference.colorize(model, images[2], steps=3, seed=k, eta=1.0)[0], float) for k in (0, 1)]
    diff = [[np.abs(a - np.asarray(b, float)).max() for b in results[2]] for a in alone]
    assert diff[0][0] <= 2 and diff[1][1] <= 2 and min(diff[0][1], diff[1][0]) > 8, diff  # seeds differ
