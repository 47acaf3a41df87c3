"""inference.py on a folder: every image done, failures listed in the folder's order, batches of one model
resolution. The tiny random-initialised checkpoint of conftest.py, the command run in-process (cli)."""
import os

from PIL import Image

import inference
from conftest import assert_same_lightness, lightness, open_image, photo


def test_folder_mode_does_every_image_and_lists_the_failures(cli, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, (w, h) in enumerate([(20, 24), (20, 24), (20, 24), (33, 17)]):  # 3 share a model size, 1 does not
        photo(w, h, seed=i).save(src / f"ok_{i}.{'png' if i % 2 else 'jpg'}")
    (src / "text.png").write_text("not an image")
    (src / "empty.jpg").write_bytes(b"")
    data = (src / "ok_0.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "notes.txt").write_text("ignored: not an image extension")
    (src / "sub").mkdir()
    code, _, err = cli("--image-path", src, "--steps", 2, "--batch-size", 2)
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert [line.split(":")[1].strip().split(os.sep)[-1] for line in failed] == \
        ["empty.jpg", "text.png", "truncated.jpg"]  # in the folder's order, whatever the batches'
    out = tmp_path / "photos_color"
    assert sorted(os.listdir(out)) == ["ok_0.jpg", "ok_1.png", "ok_2.jpg", "ok_3.png"]
    for i in range(4):
        name = f"ok_{i}.{'png' if i % 2 else 'jpg'}"
        assert open_image(out / name).size == open_image(src / name).size
    assert_same_lightness(out / "ok_1.png", lightness(open_image(src / "ok_1.png")))
    # a second run refuses to replace them; --skip-existing leaves them; the input folder is never the output
    assert cli("--image-path", src, "--steps", 2)[0] == 1
    code, _, err = cli("--image-path", src, "--steps", 2, "--skip-existing")
    assert code == 1 and "skipping 4" in err  # the 3 bad files still fail
    code, _, err = cli("--image-path", src, "--output", src, "--overwrite")
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_folder_batches_hold_one_model_resolution(cli, tmp_path, monkeypatch):
    """Each shape of batch compiles networks of its own: a folder of wide and tall photos in name order is batched
    by model resolution (an EXIF-rotated photo by its shape as displayed), and every photo is still done."""
    src = tmp_path / "mixed"
    src.mkdir()
    for i in range(3):
        photo(40, 24, seed=i).save(src / f"{i}a_wide.png")
        photo(24, 40, seed=i).save(src / f"{i}b_tall.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, displayed tall
    photo(40, 24, seed=9).save(src / "3_rotated.jpg", exif=exif)
    calls, colorize_batch = [], inference.colorize_batch

    def spy(model, images, **kwargs):
        calls.append({inference.model_size(model, img.height, img.width) for img in images})
        return colorize_batch(model, images, **kwargs)
    monkeypatch.setattr(inference, "colorize_batch", spy)
    code, _, err = cli("--image-path", src, "--steps", 2, "--batch-size", 2)
    assert code == 0, err
    assert [len(shapes) for shapes in calls] == [1, 1, 1, 1]  # 3 wide, 4 tall: two batches each
    assert len({next(iter(shapes)) for shapes in calls}) == 2
    assert len(os.listdir(tmp_path / "mixed_color")) == 7
