"""dataset.py: the cache of whole photos, the random crops and greyscales, the loader's shapes, exact resume."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import train
import utils
from conftest import BAD_FILES, IMAGE_H, IMAGE_W, N_IMAGES
from model import Config


def test_build_cache_keeps_whole_photos_larger_than_the_training_size(photo_dir, tmp_path, monkeypatch):
    images, names = dataset.build_cache(str(photo_dir), 16, str(tmp_path), workers=1)
    assert names == sorted(os.listdir(photo_dir)) and len(names) == N_IMAGES
    short = dataset.CACHE_SCALE * 16
    # the whole photo, aspect kept (40x48 -> 32x38), as RGB bytes
    assert all(x.dtype == torch.uint8 and x.shape == (3, round(IMAGE_H * short / IMAGE_W), short) for x in images)
    ref = utils.load_image(photo_dir / names[3]).resize((short, images[3].shape[1]), Image.BICUBIC)
    assert (images[3].permute(1, 2, 0).int() - torch.from_numpy(np.array(ref)).int()).abs().float().mean() < 2
    monkeypatch.setattr(dataset, "Pool", None)  # a second call reads the cache file instead of decoding again
    images2, names2 = dataset.build_cache(str(photo_dir), 16, str(tmp_path), workers=1)
    assert names == names2 and all(torch.equal(a, b) for a, b in zip(images, images2))


def test_build_cache_skips_bad_files_with_one_warning_each(bad_dir, tmp_path, capsys):
    images, names = dataset.build_cache(str(bad_dir), 16, str(tmp_path), workers=1)
    assert names == ["good_1.jpg", "good_2.png"] and len(images) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(BAD_FILES), err
    for name in BAD_FILES:
        hits = [line for line in err if name in line]
        assert len(hits) == 1 and hits[0].startswith("warning: skipping"), (name, err)
    assert "greyscale" in next(line for line in err if "grey.jpg" in line)


def test_build_cache_with_no_usable_image_is_a_clear_error(tmp_path):
    folder = tmp_path / "only_bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("nope")
    with pytest.raises(ValueError, match="no usable colour images"):
        dataset.build_cache(str(folder), 16, str(tmp_path / "cache"), workers=1)
    with pytest.raises(FileNotFoundError):
        dataset.build_cache(str(tmp_path / "missing"), 16, str(tmp_path / "cache"), workers=1)


def test_validation_split_is_deterministic_and_disjoint(photo_dir, shared_cache):
    names = [f"{i:06d}.jpg" for i in range(20000)]
    split = [dataset.is_validation(n, 2.0) for n in names]
    assert split == [dataset.is_validation(n, 2.0) for n in reversed(names)][::-1]  # by name, not by position
    assert 0.015 < sum(split) / len(split) < 0.025
    assert all(dataset.is_validation(n, 10.0) for n, v in zip(names, split) if v)  # only moves files in
    images, files = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    train_ds, val_ds = dataset.load_split(str(photo_dir), 16, 25.0, str(shared_cache))
    expected = [images[i] for i, f in enumerate(files) if dataset.is_validation(f, 25.0)]
    assert 0 < len(val_ds) == len(expected) < N_IMAGES and len(train_ds) + len(val_ds) == N_IMAGES
    assert all(torch.equal(a, b) for a, b in zip(val_ds.images, expected))
    assert train_ds.train and not val_ds.train


def test_batch_shapes_have_the_training_size_as_short_side():
    for aspect in dataset.ASPECTS:
        h, w = dataset.batch_shape(64, aspect)
        assert min(h, w) == 64 and h % 8 == 0 and w % 8 == 0 and abs(h / w - aspect) < 0.1
    assert dataset.batch_shape(64, 1.25) == (80, 64)  # a CelebA portrait, as inference runs it


def test_an_example_is_a_greyscale_L_and_the_true_ab(shared_cache, photo_dir):
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    ds = dataset.PhotoDataset(images, train=True, seed=0)
    for i in range(len(images)):
        x, scene = ds[(i, 24, 16)]
        assert scene is False  # one folder of portraits
        assert x.shape == (3, 24, 16) and x[0].min() >= -1 and x[0].max() <= 1
        # ab is the crop's own colour: the L channel alone carries the greyscale's changes. Check it by
        # converting the example back: its chroma is that of a colour photo, not of a grey one
        assert x[1:].abs().mean() > 0.02
    # validation examples: the centre at the batch's aspect, LAB's own L, no randomness
    plain = dataset.PhotoDataset(images)
    assert torch.equal(plain[(2, 24, 16)][0], plain[(2, 24, 16)][0])
    crop = plain[(2, 32, 16)][0]
    rgb = utils.lab_to_rgb(crop[None].numpy())
    assert crop.shape == (3, 32, 16) and np.abs(utils.rgb_to_lab(rgb)[0] - crop.numpy()).max() < 0.02


def test_augmentation_is_a_function_of_seed_epoch_index(shared_cache, photo_dir):
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    a, b = dataset.PhotoDataset(images, train=True, seed=3), dataset.PhotoDataset(images, train=True, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    for i in (0, 5, 11):
        assert torch.equal(a[(i, 16, 16)][0], b[(i, 16, 16)][0])
    b.set_epoch(3)
    assert any(not torch.equal(a[(i, 16, 16)][0], b[(i, 16, 16)][0]) for i in range(len(images)))
    c = dataset.PhotoDataset(images, train=True, seed=4)
    c.set_epoch(2)
    assert any(not torch.equal(a[(i, 16, 16)][0], c[(i, 16, 16)][0]) for i in range(len(images)))


def test_crop_area_sets_how_much_of_the_photo_a_crop_shows():
    """Config.crop_area reaches the crops: on a horizontal ramp, a crop of a quarter of the photo's area spans
    about half its width, one of the whole area all of it."""
    ramp = torch.linspace(0, 255, 200).round().to(torch.uint8).expand(3, 200, 200).contiguous()

    def span(area):  # the ramp's range across the crop's middle row, as a share of the photo's, over seeds
        spans = []
        for seed in range(20):
            crop = dataset.random_crop(ramp, 64, 64, torch.Generator().manual_seed(seed), (area, area))
            spans.append((crop[0, 32, -2].float() - crop[0, 32, 1].float()).abs().item() / 255)
        return float(np.median(spans))
    assert abs(span(0.25) - 0.5) < 0.08 and abs(span(1.0) - 1.0) < 0.1, (span(0.25), span(1.0))
    args = train.parse_args(["--crop-area", "0.15,2.6"])[3]
    assert args["crop_area"] == (0.15, 2.6) and Config.from_dict(args).crop_area == (0.15, 2.6)
    with pytest.raises(ValueError, match="crop_area"):
        Config(crop_area=(2.0, 1.0))


def test_greyscales_are_made_in_several_ways():
    """Over many draws: LAB's L, PIL's Rec. 601 and others, so the L the model sees is not always LAB's."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 16, 16, generator=g)
    lab_L = torch.from_numpy(utils.rgb_to_lab(rgb[None].numpy())[0, :1])
    pil = torch.from_numpy(np.array(Image.fromarray((rgb.permute(1, 2, 0) * 255).round().byte().numpy())
                                      .convert("L"), dtype=np.float32) / 255)
    greys = [dataset.random_greyscale(rgb, g) for _ in range(200)]
    assert all(x.shape == (1, 16, 16) and x.min() >= 0 and x.max() <= 1 for x in greys)
    as_l = [dataset.grey_to_l(x) for x in greys]
    assert any((L - lab_L).abs().max() < 0.01 for L in as_l)          # LAB's own L, untouched
    assert any((x[0] - pil).abs().max() < 1 / 255 + 1e-3 for x in greys)  # PIL's convert("L"), untouched
    assert sum((L - lab_L).abs().mean() > 0.02 for L in as_l) > 50     # and many that differ


def test_make_loader_shards_skips_and_gives_each_batch_one_shape(shared_cache, photo_dir):
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    ds = dataset.PhotoDataset(images)

    def run(**kw):
        return [batch for batch, scene in dataset.make_loader(ds, 4, 16, **{"epoch": 1, "seed": 0, **kw})]

    full = run()
    assert all(scene.tolist() == [False] * 4 for _, scene in dataset.make_loader(ds, 4, 16))  # each example's kind
    assert len(full) == N_IMAGES // 4
    assert {tuple(b.shape[-2:]) for b in full} <= {dataset.batch_shape(16, a) for a in dataset.ASPECTS}
    assert len({tuple(b.shape[-2:]) for e in range(8) for b in run(epoch=e)}) > 1, "rectangles too"
    shards = [run(rank=r, world_size=2) for r in (0, 1)]
    assert [b.shape for b in shards[0]] == [b.shape for b in shards[1]]  # ranks agree on each batch's shape
    resumed = run(skip_batches=2)
    assert len(resumed) == len(full) - 2 and all(torch.equal(x, y) for x, y in zip(resumed, full[2:]))
    assert not all(torch.equal(x, y) for x, y in zip(run(epoch=2), full) if x.shape == y.shape)


def test_mean_ab_is_the_mean_colour(shared_cache, photo_dir):
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    means = [utils.rgb_to_lab(x[None].numpy() / 255)[0, 1:].mean(axis=(1, 2)) for x in images]
    expected = torch.from_numpy(np.mean(means, 0))
    assert torch.allclose(dataset.mean_ab(images), expected, atol=1e-6) and expected.abs().max() > 0.01


def test_scene_crops_stay_inside_the_photo_and_level():
    """A scene is cropped as it is: on a top-to-bottom ramp (a sky over ground) every crop runs the same way,
    within the photo's range (no reflect padding mirrors it), and level (each row one value)."""
    ramp = torch.linspace(0, 255, 120).round().to(torch.uint8)[:, None].expand(3, 120, 160).contiguous()
    for seed in range(40):
        crop = dataset.random_crop(ramp, 48, 64, torch.Generator().manual_seed(seed), (0.3, 1.0), scene=True)
        column = crop[0, :, 32].float()
        assert crop.shape == (3, 48, 64) and (column.diff() >= -1).all(), seed  # the sky stays on top
        assert (crop[0].float() - column[:, None]).abs().max() <= 1, seed  # level: no rotation
    # portraits may still be rotated and zoomed out into mirrored padding: some crops are not monotonic
    face_crops = [dataset.random_crop(ramp, 48, 64, torch.Generator().manual_seed(s)) for s in range(40)]
    assert any((c[0, :, 32].float().diff() < -1).any() for c in face_crops)


def test_mix_order_gives_each_folder_its_weight_s_share():
    parts = [(100, 1.0, False), (30, 1.0, True), (20, 2.0, True)]
    order = dataset.mix_order(parts, seed=0, epoch=0)
    assert len(order) == 150 and order == dataset.mix_order(parts, seed=0, epoch=0)
    counts = [sum(lo <= i < hi for i in order) for lo, hi in ((0, 100), (100, 130), (130, 150))]
    assert counts == [38, 38, 74]  # 1:1:2 of 150
    assert len(set(i for i in order if i < 100)) == 38  # the large folder: distinct photos, taking turns
    assert set(i for i in order if 100 <= i < 130) == set(range(100, 130))  # the small one: all, some twice
    assert order != dataset.mix_order(parts, seed=0, epoch=1)


def test_load_split_mixes_portraits_and_scenes(shared_cache, photo_dir, tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    rng = np.random.default_rng(5)
    from conftest import synthetic_photo
    for i in range(8):
        synthetic_photo(rng, 48, 32).save(scenes / f"scene_{i}.png")
    folders = [(str(photo_dir), 1.0, False), (str(scenes), 3.0, True)]
    train_ds, val_ds = dataset.load_split(folders, 16, 25.0, str(shared_cache))
    n_faces = sum(not dataset.is_validation(f"img_{i:03d}.jpg", 25.0) for i in range(N_IMAGES))
    n_scenes = sum(not dataset.is_validation(f"scene_{i}.png", 25.0) for i in range(8))
    assert train_ds.parts == [(n_faces, 1.0, False), (n_scenes, 3.0, True)]
    assert len(train_ds) == n_faces + n_scenes and sum(train_ds.scene) == n_scenes
    train_ds.set_epoch(1)
    shown = [train_ds.scene[j] for j in train_ds.order]
    assert abs(sum(shown) - 0.75 * len(shown)) <= 1  # scenes weigh 3 to the portraits' 1
    items = [train_ds[(i, 16, 24)] for i in range(len(train_ds))]
    assert all(x.shape == (3, 16, 24) for x, _ in items)
    assert [scene for _, scene in items] == shown  # each example says which kind of folder it came from
    # the colour sampling starts from: each folder's mean at its share
    faces, rest = train_ds.images[:n_faces], train_ds.images[n_faces:]
    expected = 0.25 * dataset.mean_ab(faces) + 0.75 * dataset.mean_ab(rest)
    assert torch.allclose(dataset.mix_mean_ab(train_ds), expected, atol=1e-6)


def test_data_flags_take_folders_with_weights():
    args = train.parse_args(["--data", "celeba,more:0.5", "--scene-data", "scenes:0.4"])[3]
    c = Config.from_dict(args)
    assert c.data == ("celeba", "more:0.5") and c.scene_data == ("scenes:0.4",)
    assert [utils.folder_weight(f) for f in c.data + c.scene_data] == [("celeba", 1.0), ("more", 0.5),
                                                                      ("scenes", 0.4)]
    assert utils.folder_weight("C:/photos") == ("C:/photos", 1.0)  # not a number: part of the path
    assert Config.from_dict({"data": "img_align_celeba"}).data == ("img_align_celeba",)  # older checkpoints
    for bad in ("scenes:0", "scenes:-1", "scenes:nan", "scenes:inf"):
        with pytest.raises(ValueError, match="weight"):
            Config(scene_data=(bad,))
