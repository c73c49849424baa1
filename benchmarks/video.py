"""Video benchmark: frames/s of ``infer clip.mp4`` against ``infer`` on the same frames as PNG images.

    python -m benchmarks.video MODEL --frames 8 --size 720x1280 --repeats 2 --out /tmp/video-bench

Makes a clip of a photo panning across the frame (scikit-image samples, H.264 + an AAC tone), decodes its
frames to PNGs (the exact pixels the video path feeds the model), then runs the two commands in separate
processes, interleaved (video, images, video, images...), and reports per run: seconds of inference (the
CLI's own figure, after the model is loaded), frames/s, the process's peak resident memory, and the
video / images time ratio (the video overhead). Also used by the tests to make their short clips.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

from export.samples import PHOTOS
from nafnet_core.cli_common import parse_size, text_table

from .common import interleaved, machine_line


def moving_frames(n: int, height: int, width: int, index: int = 0, step: int = 2) -> list[np.ndarray]:
    """``n`` RGB uint8 frames: a window panning ``step`` px per frame (down and right) across a natural photo."""
    import skimage.data
    from PIL import Image

    img = Image.fromarray(getattr(skimage.data, PHOTOS[index % len(PHOTOS)])())
    big = np.asarray(img.resize((width + step * n, height + step * n), Image.BICUBIC))
    return [np.ascontiguousarray(big[i * step:i * step + height, i * step:i * step + width]) for i in range(n)]


def make_clip(path: str | Path, frames: list[np.ndarray], rate: Fraction = Fraction(30000, 1001), audio: bool = True,
              rotation: float | None = None, faststart: bool = False, video: bool = True) -> Path:
    """Encodes ``frames`` (H.264 yuv420p, crf 12) with a 16 kHz AAC tone as long as the video.

    Args:
        rotation: display rotation to store (degrees, counter-clockwise), or None.
        faststart: put the MP4 index first (a truncated copy then still opens).
        video: False writes the audio track only.
    """
    import av

    path = Path(path)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        if video:
            h, w = frames[0].shape[:2]
            v = out.add_stream("libx264", rate=rate, options={"crf": "12", "preset": "fast"})
            v.width, v.height, v.pix_fmt = w, h, "yuv420p"
            if rotation is not None:
                v.set_display_rotation(rotation)
        if audio:
            a = out.add_stream("aac", rate=16000)
            a.layout = "mono"
        if video:
            for i, rgb in enumerate(frames):
                f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                f.pts = i
                out.mux(v.encode(f))
            out.mux(v.encode(None))
        if audio:
            samples = round(len(frames) / rate * 16000)
            t = np.arange(samples) / 16000
            wave = (0.3 * np.sin(2 * math.pi * 440 * t) * (1 + 0.5 * np.sin(2 * math.pi * 3 * t))).astype(np.float32)
            for i in range(0, samples, 1024):
                af = av.AudioFrame.from_ndarray(wave[None, i:i + 1024].copy(), format="fltp", layout="mono")
                af.sample_rate, af.pts = 16000, i
                out.mux(a.encode(af))
            out.mux(a.encode(None))
    return path


def decoded_frames(path: str | Path) -> list[np.ndarray]:
    """Every frame of a clip's first video stream as RGB uint8, decoded as ``infer`` decodes them."""
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24", src_color_range=f.color_range or None)
                for f in c.decode(c.streams.video[0])]


def _run(args: list[str]) -> tuple[float, float]:
    """(seconds of inference the CLI reports, peak RSS MB of the process)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{out}")
    seconds = float(re.search(r" in ([0-9.]+) s", out).group(1))
    return seconds, usage.ru_maxrss / 1024


def bench_video(model: str, frames: int, size: tuple[int, int], repeats: int, out: Path,
                extra: list[str] = ()) -> list[list]:
    """Rows (run, what, seconds, frames/s, peak RSS MB) of the interleaved runs, then the medians."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    clip = make_clip(out / "clip.mp4", moving_frames(frames, *size, step=8))
    pngs = out / "frames"
    pngs.mkdir(exist_ok=True)
    for i, rgb in enumerate(decoded_frames(clip)):
        Image.fromarray(rgb).save(pngs / f"{i:04d}.png")
    base = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "infer", "-m", model, "-q",
            "--overwrite", *extra]
    cmds = {"video": base + [str(clip), "--out", str(out / "video_out")],
            "images": base + [str(pngs), "--out", str(out / "images_out")]}
    rows: list[list] = []

    def run(what: str):
        def once() -> float:
            seconds, rss = _run(cmds[what])
            rows.append([sum(r[1] == what for r in rows) + 1, what, f"{seconds:.1f}", f"{frames / seconds:.3f}",
                         f"{rss:.0f}"])
            print(text_table(["run", "what", "s", "frames/s", "peak RSS MB"], rows[-1:]).splitlines()[-1], flush=True)
            return seconds

        return once

    timings = interleaved({what: run(what) for what in cmds}, repeats, warmup=0, self_timed=True)
    med = timings.medians()
    rows.append(["median", "video / images", f"{med['video']:.1f} / {med['images']:.1f}",
                 f"{frames / med['video']:.3f} / {frames / med['images']:.3f}",
                 f"ratio {timings.ratios('images')['video']:.3f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__.splitlines()[0])
    p.add_argument("model", help="what `infer --model` takes (an export directory, .onnx, checkpoint)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", default="720x1280", help="HxW of the clip")
    p.add_argument("--repeats", type=int, default=2, help="runs of each command, interleaved")
    p.add_argument("--out", type=Path, default=Path("runs/video-bench"))
    p.add_argument("extra", nargs="*", help="more `infer` options, after --")
    a = p.parse_args(argv)
    print(machine_line(), flush=True)
    rows = bench_video(a.model, a.frames, parse_size(a.size), a.repeats, a.out, a.extra)
    print(text_table(["run", "what", "s", "frames/s", "peak RSS MB"], rows))


if __name__ == "__main__":
    main()
