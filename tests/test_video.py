"""`infer` on video files: timing, audio, rotation and frames kept; the frames equal image inference;
batches; folders; faults (truncated, corrupt, no video stream, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from nafnet_core.images import to_tensor, to_uint8
from nafnet_core.metrics import psnr
from runtime.runners import Runner
from runtime.video import restore_frames

pytest.importorskip("av", reason="video tests need PyAV (pip install av, or the [video] extra)")

from benchmarks.video import make_clip, moving_frames  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 12


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny frames: one thread is fastest, and on a shared CPU two threads wait on each other (measured under load:
    the lossless test took 39 s with two threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _infer(*args):
    return CliRunner().invoke(main, ["infer", *map(str, args), "-q"])


def _expected(model, frames: list[np.ndarray]) -> list[np.ndarray]:
    """Per-frame image inference, done directly with the model: the reference for every video output."""
    with torch.inference_mode():
        return [to_uint8(model(to_tensor(f))) for f in frames]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(psnr(to_tensor(a), to_tensor(b)))


def _yuv420(rgb: np.ndarray) -> np.ndarray:
    import av

    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")


def probe(path: Path) -> dict:
    """What a test checks of a clip: frames (RGB), their times, rate, rotation, audio packets."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {"rate": v.average_rate, "width": v.codec_context.width, "height": v.codec_context.height,
                "duration": float(c.duration / av.time_base) if c.duration else None, "codec": v.codec_context.name}
        frames, times, rotations = [], [], []
        for frame in c.decode(v):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * frame.time_base))
            rotations.append(frame.rotation)
    with av.open(str(path)) as c:
        audio = [(bytes(p), float(p.pts * p.time_base)) for s in c.streams.audio for p in c.demux(s) if p.size]
        info["audio_codecs"] = [s.codec_context.name for s in c.streams.audio]
    info.update(frames=frames, times=times, rotations=rotations, audio=audio)
    return info


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """64x48, 12 frames at 29.97 fps of a moving photo, AAC audio, rotated 90 degrees by its display matrix."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    return make_clip(path, moving_frames(N, 48, 64), rate=Fraction(30000, 1001), rotation=90)


def test_lossless_output_keeps_everything_and_equals_image_inference(clip, tmp_path, tiny_checkpoint, tiny_tlc):
    out = tmp_path / "out"
    res = _infer(clip, "--model", tiny_checkpoint, "--backend", "torch", "--out", out, "--codec", "lossless")
    assert res.exit_code == 0, res.output
    src, dst = probe(clip), probe(out / "clip.mp4")
    assert len(dst["frames"]) == len(src["frames"]) == N
    assert dst["rate"] == src["rate"] == Fraction(30000, 1001)
    assert dst["times"] == src["times"]  # every frame's time stamp
    assert dst["duration"] == pytest.approx(src["duration"], abs=1e-3)
    assert (dst["width"], dst["height"]) == (64, 48)
    assert dst["rotations"] == src["rotations"] == [90] * N
    assert dst["audio_codecs"] == ["aac"] and dst["audio"] == src["audio"]  # copied: same bytes, same times
    expect = _expected(tiny_tlc[1], src["frames"])
    for got, want in zip(dst["frames"], expect):
        np.testing.assert_array_equal(got, want)  # lossless RGB: bit-exact
    assert not list(out.glob(".*.part")) and not (out / "clip.partial.mp4").exists()


def test_folder_with_videos_default_codec_batches_and_compare(clip, tmp_path, tiny_checkpoint, tiny_tlc):
    """A folder holding an image, an .mp4 and an .mkv; H.264 by default, batches of 5 frames (the last one short),
    a side-by-side compare video with the audio."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "clip.mp4").write_bytes(clip.read_bytes())
    frames = moving_frames(7, 32, 48, index=1, step=3)
    make_clip(src / "sub" / "b.mkv", frames, rate=Fraction(25), audio=False)
    Image.fromarray(frames[0]).save(src / "a.png")
    out = tmp_path / "out"
    res = _infer(src, "--model", tiny_checkpoint, "--out", out, "--batch", "5", "--compare")
    assert res.exit_code == 0, res.output
    assert "wrote 3, skipped 0" in res.output
    dst = probe(out / "clip.mp4")
    assert dst["codec"] == "h264" and len(dst["frames"]) == N and dst["audio"] == probe(clip)["audio"]
    # H.264 at crf 18 in 4:2:0: close to the expected frames after the 4:2:0 round trip alone (the random tiny
    # model's colour noise does not survive 4:2:0 chroma, so that round trip itself is only ~23 dB)
    expect = [_yuv420(f) for f in _expected(tiny_tlc[1], probe(clip)["frames"])]
    own = [_psnr(g, w) for g, w in zip(dst["frames"], expect)]
    shifted = [_psnr(g, w) for g, w in zip(dst["frames"][1:], expect)]  # each frame against the one before it
    assert min(own) > 27 and max(shifted) < min(own) - 10  # measured: 29.5-34.4 dB own, 12.4-14.3 shifted
    mkv = probe(out / "sub" / "b.mkv")
    assert len(mkv["frames"]) == 7 and mkv["rate"] == 25 and mkv["times"] == probe(src / "sub" / "b.mkv")["times"]
    cmp = probe(tmp_path / "out_compare" / "clip.mp4")
    assert (cmp["width"], cmp["height"]) == (2 * 64 + 8, 48) and len(cmp["frames"]) == N and cmp["audio"]
    # a re-run resumes: the videos are skipped like images
    res = _infer(src, "--model", tiny_checkpoint, "--out", out)
    assert "wrote 0, skipped 3" in res.output


class _Halve(Runner):
    """A fixed-batch stand-in: records every batch it is given, returns x / 2."""

    backend = "fake"

    def __init__(self, fixed_batch: int, fixed_shape=None):
        super().__init__("fp32")
        self.fixed_batch, self.fixed_shape, self.calls = fixed_batch, fixed_shape, []

    def _activate(self):
        pass

    def _deactivate(self):
        pass

    def _infer(self, x):
        self.calls.append(tuple(x.shape))
        return x / 2


@pytest.mark.parametrize("shape", [None, (32, 32)])
def test_fixed_batch_runner_gets_full_batches(shape):
    """5 frames through a batch-3 model (whole frame, or 32x32 tiles): every call has batch 3 (the last one padded),
    and every frame comes back as its own result."""
    frames = moving_frames(5, 40, 56, step=4)
    with _Halve(3, shape) as runner:
        out = restore_frames(runner, frames, "auto", 8 if shape else None)
    assert runner.calls and all(c[0] == 3 for c in runner.calls)
    for f, o in zip(frames, out):
        np.testing.assert_array_equal(o, to_uint8(to_tensor(f) / 2))


# ----------------------------------------------------------------------------------------------- faults

def test_truncated_video_keeps_the_frames_before_the_fault(clip, tmp_path, tiny_checkpoint):
    src = tmp_path / "cut.mp4"
    whole = make_clip(tmp_path / "whole.mp4", moving_frames(N, 48, 64), faststart=True)  # index first: cut data
    data = whole.read_bytes()
    src.write_bytes(data[:int(len(data) * 0.6)])
    out = tmp_path / "out"
    res = _infer(src, "--model", tiny_checkpoint, "--out", out)
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if "cut.mp4" in line and "frame" in line]
    assert len(lines) == 1, res.output
    k = int(lines[0].split("at frame ")[1].split()[0])
    assert 1 < k <= N and "partial" in lines[0]
    assert not (out / "cut.mp4").exists()  # never under the final name
    kept = probe(out / "cut.partial.mp4")
    # the frames decoded before the fault, each at its own time (with B-frames, not always a prefix)
    assert len(kept["frames"]) == k - 1 and set(kept["times"]) <= set(probe(whole)["times"])
    # the file repaired, a re-run writes it whole and drops the stale partial output
    src.write_bytes(data)
    res = _infer(src, "--model", tiny_checkpoint, "--out", out)
    assert res.exit_code == 0, res.output
    assert len(probe(out / "cut.mp4")["frames"]) == N and not (out / "cut.partial.mp4").exists()


def test_unreadable_and_audio_only_files_are_refused_in_one_line(tmp_path, tiny_checkpoint):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    make_clip(tmp_path / "song.mp4", moving_frames(N, 48, 64), video=False)
    whole = make_clip(tmp_path / "w.mp4", moving_frames(4, 48, 64)).read_bytes()
    (tmp_path / "nomoov.mp4").write_bytes(whole[:len(whole) // 2])  # index at the end: nothing to read
    for name, why in [("garbage.mp4", "cannot open as a video"), ("song.mp4", "no video stream (it holds audio)"),
                      ("nomoov.mp4", "cannot open as a video")]:
        res = _infer(tmp_path / name, "--model", tiny_checkpoint, "--out", tmp_path / "out")
        assert res.exit_code == 1 and "Traceback" not in res.output
        lines = [line for line in res.output.splitlines() if name in line and why in line]
        assert len(lines) == 1, res.output
        assert not list((tmp_path / "out").iterdir())


def test_missing_pyav_is_one_line_before_any_file(clip, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    res = _infer(clip, "--model", tiny_checkpoint, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "Error: video files need PyAV: pip install av" in res.output
    assert "Traceback" not in res.output


def test_codec_options_that_cannot_work_are_refused(clip, tmp_path, tiny_checkpoint):
    mov = make_clip(tmp_path / "c.mov", moving_frames(2, 48, 64), audio=False)
    res = _infer(mov, "--model", tiny_checkpoint, "--out", tmp_path / "o", "--codec", "ffv1")
    assert res.exit_code == 1 and "a .mov file cannot hold ffv1 video; use --codec h264 or" in res.output
    assert not (tmp_path / "o" / "c.mov").exists()
    res = _infer(clip, "--model", tiny_checkpoint, "--out", tmp_path / "o", "--codec", "lossless", "--crf", "3")
    assert res.exit_code == 1 and "has no quality setting; drop --crf" in res.output


@pytest.mark.slow
def test_kill9_mid_video_then_rerun(tmp_path, tiny_checkpoint):
    """kill -9 while a video is being written: no file under the final name; the re-run removes the temporary
    and writes the whole video."""
    n = 60
    src = make_clip(tmp_path / "long.mp4", moving_frames(n, 64, 96, step=1))
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "cli.py"), "infer", str(src), "--model", str(tiny_checkpoint), "--backend",
            "torch", "--out", str(out), "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    t0 = time.time()
    while not (out.exists() and any(f.stat().st_size > 0 for f in out.glob(".long.mp4.*.part"))):
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before the kill; make the clip longer"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert not (out / "long.mp4").exists() and list(out.glob(".long.mp4.*.part"))
    r = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed 1 temporary file(s)" in r.stdout and "wrote 1" in r.stdout
    assert len(probe(out / "long.mp4")["frames"]) == n and not list(out.glob(".*.part"))
