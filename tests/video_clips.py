"""Short test clips made with PyAV: natural-photo frames with motion, an AAC audio track, rotation metadata."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from nafnet_core.images import to_uint8
from tests.conftest import photo


def moving_frames(n: int, height: int, width: int, index: int = 0, step: int = 2) -> list[np.ndarray]:
    """``n`` RGB uint8 frames: a window sliding ``step`` px per frame across a natural photo."""
    big = to_uint8(photo(height + step * n, width + step * n, index))
    return [np.ascontiguousarray(big[i * step:i * step + height, i * step:i * step + width]) for i in range(n)]


def make_clip(path: Path, frames: list[np.ndarray], rate: Fraction = Fraction(30000, 1001), audio: bool = True,
              rotation: float | None = None, faststart: bool = False, video: bool = True) -> Path:
    """Encodes ``frames`` (H.264, yuv420p, crf 12) with a 16 kHz AAC sine track as long as the video."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
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
