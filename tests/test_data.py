"""GoPro layouts, the val/test split rule, data check, paired transforms, sample order, synthetic set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nafnet_core.data import DataError, check_dataset, detect_layout, scan, split_val_test
from nafnet_core.images import read_rgb8, write_rgb8
from train.data import PairDataset, PairTransform, SampleStream


def _img(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_dblur(root: Path, n_train: int = 3, n_test: int = 5, size=(40, 48)) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            for kind in ("blur", "sharp"):
                write_rgb8(root / split / kind / f"{i + 1}.png", _img(*size, seed=i))
    return root


def make_gopro_large(root: Path, size=(40, 48)) -> Path:
    for split, seqs in (("train", {"GOPR0372_07_00": 2, "GOPR0374_11_00": 1}), ("test", {"GOPR0384_11_00": 2,
                                                                                           "GOPR0385_11_01": 2})):
        for seq, n in seqs.items():
            for i in range(n):
                for kind in ("blur", "blur_gamma", "sharp"):
                    write_rgb8(root / split / seq / kind / f"{i:06d}.png", _img(*size, seed=i))
    return root


def test_dblur_layout_and_natural_order(tmp_path):
    root = make_dblur(tmp_path / "Gopro", n_train=3, n_test=11)
    assert detect_layout(root) == "dblur"
    report = check_dataset(root, full=True)
    assert report.ok, report.summary()
    assert [p.name for p in report.pairs["train"]] == ["1.png", "2.png", "3.png"]
    # The rule: natural order (2 before 10), first ceil(n/2) = 6 -> val, the other 5 -> test.
    assert [p.name for p in report.pairs["val"]] == [f"{i}.png" for i in range(1, 7)]
    assert [p.name for p in report.pairs["test"]] == [f"{i}.png" for i in range(7, 12)]


def test_gopro_large_layout_blur_and_blur_gamma(tmp_path):
    root = make_gopro_large(tmp_path / "GOPRO_Large")
    assert detect_layout(root) == "gopro_large"
    report = check_dataset(root)
    assert report.ok, report.summary()
    assert [p.name for p in report.pairs["train"]] == ["GOPR0372_07_00/000000.png", "GOPR0372_07_00/000001.png",
                                                       "GOPR0374_11_00/000000.png"]
    assert [p.name for p in report.pairs["val"]] == ["GOPR0384_11_00/000000.png", "GOPR0384_11_00/000001.png"]
    assert [p.name for p in report.pairs["test"]] == ["GOPR0385_11_01/000000.png", "GOPR0385_11_01/000001.png"]
    assert report.pairs["train"][0].blur.parent.name == "blur"
    gamma = scan(root, blur_dir="blur_gamma")
    assert gamma.pairs["train"][0].blur.parent.name == "blur_gamma"


def test_split_is_deterministic_and_disjoint():
    from nafnet_core.data import Pair

    pairs = [Pair(Path(f"b{i}"), Path(f"s{i}"), f"{i}.png") for i in (5, 1, 10, 2, 3)]
    val, test = split_val_test(pairs)
    assert [p.name for p in val] == ["1.png", "2.png", "3.png"] and [p.name for p in test] == ["5.png", "10.png"]
    assert split_val_test(list(reversed(pairs))) == (val, test)


def test_check_lists_every_bad_file(tmp_path):
    root = make_dblur(tmp_path / "bad", n_train=4, n_test=2)
    (root / "train/sharp/2.png").unlink()  # missing partner
    write_rgb8(root / "train/sharp/3.png", _img(30, 48, 3))  # size mismatch
    (root / "train/blur/4.png").write_bytes(b"this is not a png")  # corrupt
    (root / "train/blur/notes.txt").write_text("hello")  # non-image file
    report = check_dataset(root)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{root / 'train/blur/2.png'}: missing partner {root / 'train/sharp/2.png'}" in text
    assert f"{root / 'train/blur/3.png'}: size 48x40 differs from its partner" in text
    assert f"{root / 'train/blur/4.png'}: not a readable image" in text
    assert f"{root / 'train/blur/notes.txt'}: not an image file" in text
    assert len(report.problems) == 4
    # Too small for the training crop.
    assert any("smaller than the training crop 64" in p for p in check_dataset(make_dblur(tmp_path / "s"),
                                                                                min_size=64).problems)


def test_check_truncated_file_needs_full(tmp_path):
    root = make_dblur(tmp_path / "t", n_train=1, n_test=1, size=(64, 64))
    path = root / "train/blur/1.png"
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixels cut
    assert check_dataset(root).ok  # header-only check cannot see it ...
    full = check_dataset(root, full=True)  # ... a full decode does
    assert not full.ok and str(path) in full.problems[0]


def test_empty_folder_and_wrong_layout(tmp_path):
    root = tmp_path / "empty"
    (root / "train/blur").mkdir(parents=True)
    (root / "train/sharp").mkdir(parents=True)
    report = check_dataset(root)
    assert any(p.startswith(f"{root / 'train'}: no image pairs found") for p in report.problems)
    assert any(p.startswith(f"{root / 'test'}: missing folder") for p in report.problems)
    (tmp_path / "flat").mkdir()
    write_rgb8(tmp_path / "flat/a.png", _img(8, 8, 0))
    with pytest.raises(DataError, match="wrong layout.*DBlur layout.*GOPRO_Large"):
        check_dataset(tmp_path / "flat")
    with pytest.raises(DataError, match="no such folder"):
        check_dataset(tmp_path / "missing")


def test_data_check_cli_exit_codes(tmp_path):
    from cli import main

    good = make_dblur(tmp_path / "good")
    r = CliRunner().invoke(main, ["data", "check", str(good), "--full"])
    assert r.exit_code == 0, r.output
    assert "train      3 pairs" in r.output and "no problems found" in r.output
    (good / "test/sharp/1.png").unlink()
    r = CliRunner().invoke(main, ["data", "check", str(good)])
    assert r.exit_code == 1 and "missing partner" in r.output and "1 problem(s)" in r.output
    r = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "no such folder" in r.output


# ---------------------------------------------------------------------------------------------------
# Paired transforms


def _pair(h=50, w=70):
    sharp = _img(h, w, 1)
    blur = (sharp.astype(np.int16) // 2).astype(np.uint8)  # blur = f(sharp) pixel-wise: alignment is checkable
    return blur, sharp


def test_random_crop_is_aligned_and_covers_positions():
    blur, sharp = _pair()
    t = PairTransform("random", 32, 0.5, 0.5, 0.5)
    seen = set()
    for seed in range(40):
        b, s = t(blur, sharp, np.random.default_rng(seed))
        assert b.shape == s.shape == (32, 32, 3)
        np.testing.assert_array_equal(b, (s.astype(np.int16) // 2).astype(np.uint8))
        seen.add(b.tobytes())
    assert len(seen) > 30


def test_flips_transpose_center_and_resize():
    blur, sharp = _pair(40, 60)
    rng = np.random.default_rng
    b, s = PairTransform("none", 0, 1.0, 0.0, 0.0)(blur, sharp, rng(0))
    np.testing.assert_array_equal(s, sharp[:, ::-1])
    b, s = PairTransform("none", 0, 0.0, 1.0, 0.0)(blur, sharp, rng(0))
    np.testing.assert_array_equal(s, sharp[::-1])
    b, s = PairTransform("none", 0, 0.0, 0.0, 1.0)(blur, sharp, rng(0))
    np.testing.assert_array_equal(s, sharp.transpose(1, 0, 2))
    np.testing.assert_array_equal(b, blur.transpose(1, 0, 2))
    b, s = PairTransform("none", 0, 0.0, 0.0, 0.0)(blur, sharp, rng(0))
    np.testing.assert_array_equal(s, sharp)
    b, s = PairTransform("center", 20, 0.0, 0.0, 0.0)(blur, sharp, rng(0))
    np.testing.assert_array_equal(s, sharp[10:30, 20:40])
    b, s = PairTransform("resize", 24, 0.0, 0.0, 0.0)(blur, sharp, rng(0))
    assert b.shape == s.shape == (24, 24, 3)
    # Flip frequencies follow their probabilities.
    t = PairTransform("none", 0, 0.2, 0.0, 0.0)
    flips = sum(not np.array_equal(t(blur, sharp, rng(i))[1], sharp) for i in range(500))
    assert 70 < flips < 130
    with pytest.raises(DataError, match="smaller than the crop 64"):
        PairTransform("random", 64)(blur, sharp, rng(0))


def test_dataset_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    root = make_dblur(tmp_path / "d", n_train=3, n_test=1, size=(48, 48))
    pairs = scan(root).pairs["train"]
    ds = PairDataset(pairs, PairTransform("random", 16), seed=7)
    a, b = ds[(1, 3)], PairDataset(pairs, PairTransform("random", 16), seed=7, cache=True)[(1, 3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(ds[(1, 4)][0], a[0])
    assert a[0].dtype == np.float32 or str(a[0].dtype) == "torch.float32"


def test_sample_stream_epochs_ranks_and_resume():
    one = SampleStream(10, batch=4, seed=3)
    positions = [one.sample(p) for p in range(30)]
    for e in range(3):  # every epoch is a permutation
        assert sorted(i for i, ep in positions if ep == e) == list(range(10))
    assert one.micro_batch(2, 0) == positions[8:12]  # step 2 spans the end of epoch 0 and the start of epoch 1
    # Two ranks x two micro-batches together see exactly the single-process batch of each step.
    for step in range(6):
        parts = [SampleStream(10, 4, seed=3, world=2, rank=r, accum=2).micro_batch(step, a) for a in range(2)
                 for r in range(2)]
        assert sorted(sum(parts, [])) == sorted(one.micro_batch(step, 0))
    # Resuming at step k yields what an uninterrupted stream yields from step k on.
    it_full, it_resumed = one.batches(0), SampleStream(10, 4, seed=3).batches(5)
    full = [next(it_full) for _ in range(9)]
    assert [next(it_resumed) for _ in range(4)] == full[5:]
    with pytest.raises(ValueError, match="divisible"):
        SampleStream(10, batch=6, world=4)


# ---------------------------------------------------------------------------------------------------
# Synthetic set


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_and_gopro_like(tmp_path):
    import torch

    from nafnet_core.metrics import psnr
    from nafnet_core.synth import synthesize

    a = synthesize(tmp_path / "a", seed=5, count=3, size=(64, 96), progress=False)
    b = synthesize(tmp_path / "b", seed=5, count=3, size=(64, 96), progress=False)
    c = synthesize(tmp_path / "c", seed=6, count=3, size=(64, 96), progress=False)
    assert _tree_hash(a) == _tree_hash(b) != _tree_hash(c)
    report = check_dataset(a, full=True)
    assert report.ok and [len(report.pairs[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    scores = []
    for pair in report.pairs["train"] + report.pairs["val"] + report.pairs["test"]:
        blur, sharp = (torch.from_numpy(read_rgb8(p)).permute(2, 0, 1)[None] for p in (pair.blur, pair.sharp))
        scores.append(float(psnr(blur, sharp)))
    assert all(15 < s < 40 for s in scores), scores  # blurred, but the same scene
    with pytest.raises(Exception, match="not empty"):
        synthesize(a, seed=5, count=1, progress=False)
    assert not list(tmp_path.glob(".*.part"))  # no temporary trees left behind


def test_synth_blur_is_centred_on_the_sharp_frame():
    """Bright dots on black: each blurs into a streak whose centre of mass (linear light) is the dot's sharp
    position, for a curved path whose middle sub-frame is ~1 px away from its mean position (version 1 put the
    sharp frame there); a path of no motion renders the sharp window exactly."""
    from dataclasses import replace

    import torch

    from nafnet_core.synth import MARGIN, BlurParams, _subframes_needed, load_photo, render_pair, srgb_to_linear

    h, w = 64, 96
    photo = np.zeros((h + 2 * MARGIN + 8, w + 2 * MARGIN + 8, 3), np.uint8)
    dots = [(20, 30), (40, 70)]  # (y, x) in the output frame
    for y, x in dots:
        photo[MARGIN + y, MARGIN + x] = 255
    curved = [[3.0, 1.0], [3.0, -1.5], [0.5, 0.3]]  # a2 / 3 = (1, -0.5) px from the middle sub-frame
    p = BlurParams(photo="dots", scale=1.0, top=0, left=0, mirror=False, translation=curved, rotation=[0.0, 0.0],
                   zoom=0.0, center=[48.0, 32.0], subframes=0)
    p = replace(p, subframes=_subframes_needed(p, (h, w)))
    blur, sharp = render_pair(photo, p, (h, w))
    lin = srgb_to_linear(torch.from_numpy(blur).double() / 255).mean(-1).numpy()
    yy, xx = np.mgrid[-12:13, -12:13]
    for y, x in dots:
        assert sharp[y, x].tolist() == [255, 255, 255]
        streak = lin[y - 12:y + 13, x - 12:x + 13]
        assert (streak > 0.01).sum() >= 8  # a streak, not a dot
        centre = ((streak * xx).sum() / streak.sum(), (streak * yy).sum() / streak.sum())
        assert abs(centre[0]) < 0.05 and abs(centre[1]) < 0.05, centre

    still = replace(p, translation=[[0.0, 0.0]] * 3, subframes=5)
    blur, sharp = render_pair(load_photo("astronaut.png"), still, (h, w))
    np.testing.assert_array_equal(blur, sharp)


def test_synth_blur_varies_across_the_frame():
    """Rotation + zoom: the displacement between the first and last sub-frame differs across the frame."""
    import torch

    from nafnet_core.synth import _source_points, draw_params, load_photo

    photo = load_photo("astronaut.png")
    p = draw_params(np.random.default_rng(0), photo, "astronaut.png", (64, 96))
    assert p.subframes >= 9 and p.subframes % 2 == 1
    corners = torch.tensor([[0.0, 0.0], [96.0, 64.0]], dtype=torch.float64)
    ends = _source_points(p, torch.tensor([-1.0, 1.0], dtype=torch.float64), corners)
    extent = (ends[1] - ends[0]).norm(dim=-1)
    assert abs(float(extent[0] - extent[1])) > 0.2


def test_synth_shake_scales_the_camera_path_from_the_same_draws():
    """``shake`` scales the trajectory drawn from the same random numbers: shake=1 is the default set's pair,
    a weaker shake needs fewer sub-frames, keeps the window and is closer to sharp, a stronger one farther."""
    import torch

    from nafnet_core.metrics import psnr
    from nafnet_core.synth import default_root, draw_params, load_photo, render_pair
    from train.config import ConfigError, build_config

    photo = load_photo("rocket.jpg")
    params = {b: draw_params(np.random.default_rng([7, 0, 1]), photo, "rocket.jpg", (64, 96), b)
              for b in (0.5, 1.0, 2.0)}
    assert params[1.0] == draw_params(np.random.default_rng([7, 0, 1]), photo, "rocket.jpg", (64, 96))
    assert (params[0.5].top, params[0.5].scale) == (params[1.0].top, params[1.0].scale)  # same scene window
    np.testing.assert_allclose(np.array(params[0.5].translation) * 2, params[1.0].translation)
    assert params[0.5].zoom * 4 == pytest.approx(params[2.0].zoom)
    assert params[0.5].subframes < params[1.0].subframes < params[2.0].subframes
    scores = []
    for b in (0.5, 1.0, 2.0):
        blur, sharp = (torch.from_numpy(a).permute(2, 0, 1) for a in render_pair(photo, params[b], (64, 96)))
        scores.append(float(psnr(blur, sharp)[0]))
    assert scores[0] > scores[1] + 1 and scores[1] > scores[2] + 1, scores
    assert default_root(0, 24) != default_root(0, 24, 0.5)  # a set of its own in the cache
    assert default_root(0, 24, 0.5).name.endswith("-shake0.5")
    with pytest.raises(ConfigError, match="synth_shake"):
        build_config("demo", sets={"synth_shake": 0})


def test_data_synth_cli(tmp_path):
    from cli import main

    r = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "s"), "--count", "2", "--size", "48x64"])
    assert r.exit_code == 0, r.output
    assert read_rgb8(tmp_path / "s/train/blur/0000.png").shape == (48, 64, 3)
    r = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "t"), "--size", "48by64"])
    assert r.exit_code == 1 and "Error: --size must look like" in r.output
