"""Deblur video files: every frame through the same Runner, tiling and TLC path as images, streamed.

    file -> demux (PyAV) -> decode -> RGB uint8 frames, ``batch`` at a time -> to_tensor -> restore (pad,
         tiles, Runner.infer, blend, crop) -> from_tensor (clamp, round) -> encode -> mux into a hidden
         temporary beside the output -> rename onto the output name when the last frame is in
    audio packets -> copied into the output unchanged (remuxed, not re-encoded)

Memory is bounded by a batch of frames plus the encoder's look-ahead, never the clip. The output keeps the
input's container, frame count, each frame's time stamp (pts in the input stream's time base, so variable
frame rates survive), frame rate, resolution, rotation (the display matrix), colour tags and audio streams.
Frames are restored as they are stored (a rotated phone clip is deblurred unrotated, and keeps its matrix).

Faults: a file with no video stream, or that FFmpeg cannot open, is refused with one line. When decoding
fails part-way (a corrupt or truncated file), the frames decoded before the fault are encoded and kept as
``NAME.partial.SUFFIX`` beside the output, a complete playable file, and the error names the input and the
frame where decoding failed; the final name is never written, so a re-run processes the file again (and a
successful re-run removes the stale ``.partial`` file). A killed run leaves only a hidden ``.NAME.*.part``
temporary, which the next run into that folder removes (nafnet_core.fileio).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from nafnet_core.errors import UserError, first_line
from nafnet_core.fileio import atomic_path
from nafnet_core.images import VIDEO_FORMATS, Decoded, from_tensor, to_tensor

from .restore import restore, side_by_side
from .runners import Runner


@dataclass(frozen=True)
class VideoCodec:
    """One ``--codec`` choice.

    Attributes:
        encoders: FFmpeg encoders that implement it, in order of preference (the first one this build has).
        pix_fmt: pixel format fed to the encoder (RGB formats keep the restored RGB exactly).
        crf: default ``--crf`` (quality: lower is better), or None for lossless codecs (no quality knob).
        options: encoder options.
        lossless: decoded output frames equal the restored RGB frames bit for bit.
    """

    encoders: tuple[str, ...]
    pix_fmt: str
    crf: int | None
    options: dict = field(default_factory=dict)
    lossless: bool = False

    @property
    def rgb(self) -> bool:
        return self.pix_fmt in ("rgb24", "bgr0", "gbrp")


#: ``--codec`` choices. ``auto`` = the first of these the output container holds and this FFmpeg build has.
VIDEO_CODECS = {
    "h264": VideoCodec(("libx264",), "yuv420p", 18, {"preset": "medium"}),
    "vp9": VideoCodec(("libvpx-vp9",), "yuv420p", 32, {"b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"}),
    "mpeg4": VideoCodec(("mpeg4",), "yuv420p", None, {"qmin": "1", "qmax": "3"}),
    # Lossless, for measurement: RGB in, the same RGB out (YUV 4:2:0 would lose chroma).
    "lossless": VideoCodec(("libx264rgb",), "rgb24", None, {"crf": "0", "preset": "medium"}, lossless=True),
    "ffv1": VideoCodec(("ffv1",), "bgr0", None, {}, lossless=True),
}
AUTO_CODECS = ("h264", "vp9", "mpeg4")


class VideoError(UserError):
    """A video that cannot be read or written; the message names the file (and the frame, for faults)."""


def import_av():
    """PyAV, or one line saying how to install it."""
    try:
        import av
    except ImportError:
        raise UserError("video files need PyAV: pip install av  (or pip install -e '.[video]')") from None
    return av


def partial_path(output: Path) -> Path:
    """Where the frames before a decoding fault are kept: ``clip.mp4`` -> ``clip.partial.mp4``."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def choose_codec(codec: str, muxer: str, output: Path) -> tuple[str, VideoCodec]:
    """(FFmpeg encoder, codec entry) for ``--codec codec`` in the container ``muxer``; refuses what cannot work."""
    av = import_av()
    names = AUTO_CODECS if codec == "auto" else (codec,)
    if codec != "auto" and codec not in VIDEO_CODECS:
        raise UserError(f"unknown --codec {codec!r}; choose auto, {', '.join(VIDEO_CODECS)}")
    supported = _muxer_codecs(av, muxer)
    missing = []
    for name in names:
        for encoder in VIDEO_CODECS[name].encoders:
            try:
                av.codec.Codec(encoder, "w")
            except (av.codec.codec.UnknownCodecError, ValueError):
                missing.append(encoder)
                continue
            if encoder in supported:
                return encoder, VIDEO_CODECS[name]
    if codec != "auto" and not missing:
        can = [n for n, c in VIDEO_CODECS.items() if any(e in supported for e in c.encoders)]
        raise VideoError(f"{output}: a {output.suffix} file cannot hold {codec} video; use --codec "
                         f"{' or '.join(can) or 'auto'} for {output.suffix}")
    raise VideoError(f"{output}: this FFmpeg build (PyAV {av.__version__}) has no encoder for --codec {codec} "
                     f"({', '.join(missing)} missing); choose another --codec")


def _muxer_codecs(av, muxer: str) -> set[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d, av.open(os.path.join(d, "probe"), "w", format=muxer) as probe:
        return set(probe.supported_codecs)


# ----------------------------------------------------------------------------------------------- output

class _Writer:
    """One output file being written: the encoder, the copied audio streams, into a temporary path."""

    def __init__(self, av, path: Path, muxer: str, encoder: str, codec: VideoCodec, crf: int | None,
                 vin, audio_in: list, width: int, height: int, first_frame):
        self.av = av
        self.container = av.open(str(path), "w", format=muxer)
        rate = vin.average_rate or vin.guessed_rate or vin.base_rate
        options = dict(codec.options)
        if codec.crf is not None:
            options["crf"] = str(codec.crf if crf is None else crf)
        vout = self.container.add_stream(encoder, rate=rate, options=options)
        vout.width, vout.height = width, height
        pix_fmt = codec.pix_fmt
        if pix_fmt == "yuv420p" and (width % 2 or height % 2):  # 4:2:0 needs even sides
            pix_fmt = "yuv444p"
        vout.pix_fmt = pix_fmt
        vout.time_base = vin.time_base
        vout.codec_context.time_base = vin.time_base
        cc_in, cc_out = vin.codec_context, vout.codec_context
        cc_out.color_primaries, cc_out.color_trc = cc_in.color_primaries, cc_in.color_trc
        self.colorspace, self.color_range = None, None
        if not codec.rgb:  # YUV out: convert with the input's matrix and range, and say so in the stream
            self.colorspace = first_frame.colorspace
            self.color_range = first_frame.color_range or None
            cc_out.colorspace, cc_out.color_range = first_frame.colorspace, first_frame.color_range
        matrix = _display_matrix(first_frame)
        if matrix is not None:
            vout.set_display_matrix(matrix)
        elif vin.metadata.get("rotate"):  # the legacy tag (clockwise degrees)
            vout.set_display_rotation(-float(vin.metadata["rotate"]))
        self.video = vout
        self.pix_fmt = pix_fmt
        self.audio = {s.index: self.container.add_stream_from_template(s) for s in audio_in}

    def write(self, rgb: np.ndarray, pts: int, time_base: Fraction) -> None:
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        if frame.format.name != self.pix_fmt:
            frame = frame.reformat(format=self.pix_fmt, dst_colorspace=self.colorspace,
                                   dst_color_range=self.color_range)
        frame.pts, frame.time_base = pts, time_base
        self.container.mux(self.video.encode(frame))

    def copy(self, packet, index: int) -> None:
        """Muxes an audio packet of input stream ``index`` unchanged."""
        packet.stream = self.audio[index]
        self.container.mux(packet)

    def close(self) -> None:
        self.container.mux(self.video.encode(None))
        self.container.close()


def _display_matrix(frame) -> list[int] | None:
    """The 3x3 display matrix (9 int32, rotation and flips) a decoded frame carries, or None."""
    for sd in frame.side_data:
        if getattr(sd.type, "name", "") == "DISPLAYMATRIX":
            return np.frombuffer(bytes(sd), dtype="<i4", count=9).tolist()
    return None


# ----------------------------------------------------------------------------------------------- the loop

@dataclass
class VideoResult:
    """What ``infer_video`` wrote."""

    frames: int
    output: Path
    compare: Path | None = None


def restore_frames(runner: Runner, frames: list[np.ndarray], tile: str | int | tuple[int, int] = "auto",
                   overlap: int | None = None) -> list[np.ndarray]:
    """Same-sized RGB uint8 frames restored in one batch, through the images' path (to_tensor, restore,
    from_tensor)."""
    images = [Decoded(f) for f in frames]
    y = restore(runner, torch.cat([to_tensor(im) for im in images]), tile, overlap)
    return [from_tensor(y[i:i + 1], im).rgb for i, im in enumerate(images)]


def infer_video(runner: Runner, src: str | Path, dst: str | Path, *, tile: str | int | tuple[int, int] = "auto",
                overlap: int | None = None, codec: str = "auto", crf: int | None = None, batch: int | None = None,
                compare_dst: str | Path | None = None, max_pixels: int | None = None,
                progress: bool = True) -> VideoResult:
    """Deblurs the video ``src`` into ``dst`` (same container), frame by frame, streaming.

    Args:
        runner: an activated Runner.
        src / dst: input and output files (``dst``'s suffix picks the container, see VIDEO_FORMATS).
        tile / overlap: as for images (runtime.restore.choose_tiling).
        codec: a VIDEO_CODECS key or ``auto`` (H.264 where the container and FFmpeg build allow it).
        crf: quality of lossy codecs (lower is better; default: the codec's).
        batch: frames per model call (default: the runner's fixed batch, else 1).
        compare_dst: also write input | output side by side there.
        max_pixels: refuse larger frames (decompression-bomb guard).
        progress: show a progress bar in frames (stderr).
    """
    av = import_av()
    src, dst = Path(src), Path(dst)
    compare_dst = None if compare_dst is None else Path(compare_dst)
    muxer = VIDEO_FORMATS.get(dst.suffix.lower())
    if muxer is None:
        raise VideoError(f"{dst}: unknown video suffix; use one of {', '.join(VIDEO_FORMATS)}")
    if crf is not None and codec in VIDEO_CODECS and VIDEO_CODECS[codec].crf is None:
        raise UserError(f"--codec {codec} has no quality setting; drop --crf")
    encoder, entry = choose_codec(codec, muxer, dst)
    if batch is None:
        batch = runner.fixed_batch or 1
    try:
        inp = av.open(str(src), metadata_errors="ignore")
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{src}: cannot open as a video ({_why(e)}); corrupt, truncated or not a video") from None
    with contextlib.closing(inp):
        vin = next((s for s in inp.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)
        if vin is None:
            kinds = sorted({s.type for s in inp.streams}) or ["no streams"]
            raise VideoError(f"{src}: no video stream (it holds {', '.join(kinds)}); nothing to deblur")
        width, height = vin.codec_context.width, vin.codec_context.height
        if max_pixels is not None and width * height > max_pixels:
            raise VideoError(f"{src}: {width}x{height} frames exceed the limit of {max_pixels:,} pixels; raise it "
                             "with --max-pixels or NAFNET_MAX_PIXELS if the video is genuine")
        vin.thread_type = "AUTO"
        audio_in = list(inp.streams.audio)
        targets = [dst] + ([compare_dst] if compare_dst is not None else [])
        with contextlib.ExitStack() as stack:
            temps = [stack.enter_context(atomic_path(t)) for t in targets]
            state = _Stream(runner, vin, audio_in, tile, overlap, batch, progress, src)
            writers: list[_Writer] = []

            def open_writers(first_frame) -> list[_Writer]:
                sizes = [(width, height), (2 * width + 8, height)]
                for tmp, (w, h) in zip(temps, sizes):
                    writers.append(_Writer(av, tmp, muxer, encoder, entry, crf, vin, audio_in, w, h, first_frame))
                return writers

            try:
                fault = state.run(inp, open_writers)
                for w in writers:
                    w.close()
            except av.FFmpegError as e:
                raise VideoError(f"{dst}: cannot encode or write the video ({_why(e)})") from None
            if fault is not None:
                n = state.written
                if n == 0:
                    raise VideoError(f"{src}: {fault}; nothing written")
                kept = [_keep(tmp, partial_path(t)) for tmp, t in zip(temps, targets)]
                raise VideoError(f"{src}: {fault}; the {n} frame(s) before it are in {kept[0]}")
        for t in targets:
            with contextlib.suppress(FileNotFoundError):
                partial_path(t).unlink()  # a re-run that succeeds replaces an earlier run's partial output
    return VideoResult(state.written, dst, compare_dst)


class _Stream:
    """Decode -> batch -> restore -> encode, with the fault (if any) recorded instead of raised."""

    def __init__(self, runner, vin, audio_in, tile, overlap, batch, progress, src: Path):
        self.runner, self.vin, self.tile, self.overlap, self.batch = runner, vin, tile, overlap, batch
        self.audio_index = {s.index for s in audio_in}
        self.progress, self.src = progress, src
        self.decoded = self.written = 0
        self.pending: list[tuple[np.ndarray, int]] = []
        self.writers: list[_Writer] = []
        self.held_audio: list = []

    def run(self, inp, open_writers) -> str | None:
        """Streams the whole file; returns None, or what went wrong and at which frame."""
        from tqdm import tqdm

        av = import_av()
        total = self.vin.frames or None  # from the index; else estimated from the duration (e.g. Matroska)
        rate = self.vin.average_rate or self.vin.guessed_rate
        if total is None and inp.duration and rate:
            total = round(inp.duration / 1_000_000 * rate)  # container duration is in microseconds (AV_TIME_BASE)
        bar = tqdm(total=total, unit="frame", desc=self.src.name, leave=False, dynamic_ncols=True,
                   disable=not self.progress)
        fault = None
        try:
            for packet in inp.demux(self.vin, *[inp.streams[i] for i in sorted(self.audio_index)]):
                if packet.stream.index in self.audio_index:
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    if self.writers:
                        self._copy(packet, packet.stream.index)
                    else:  # audio that comes before the first video frame waits for the output to open
                        self.held_audio.append((packet, packet.stream.index))
                    continue
                for frame in packet.decode():
                    if not self.writers:
                        self.writers = open_writers(frame)
                        for held, index in self.held_audio:
                            self._copy(held, index)
                        self.held_audio = []
                    self._add(frame, bar)
        except av.FFmpegError as e:
            with contextlib.suppress(av.FFmpegError):  # frames the decoder still holds (reordering) are good
                for frame in self.vin.decode(None):
                    if self.writers:
                        self._add(frame, bar)
            fault = f"decoding failed at frame {self.decoded + 1} ({_why(e)})"
        if fault is None and self.decoded == 0:
            fault = "no frame could be decoded"
        if fault is None and self.vin.frames and self.decoded < self.vin.frames:
            fault = f"truncated: decoding stopped at frame {self.decoded + 1} of the {self.vin.frames} its index lists"
        self._flush(bar)
        bar.close()
        return fault

    def _copy(self, packet, index: int) -> None:
        for w in self.writers:
            w.copy(packet, index)

    def _add(self, frame, bar) -> None:
        tb = self.vin.time_base
        pts = frame.pts
        if pts is None:  # no time stamp (some AVI files): place it by its index at the frame rate
            rate = self.vin.average_rate or self.vin.guessed_rate or Fraction(25)
            pts = round(self.decoded / rate / tb)
        rgb = frame.to_ndarray(format="rgb24", src_color_range=frame.color_range or None)
        self.pending.append((rgb, pts))
        self.decoded += 1
        if len(self.pending) >= self.batch:
            self._flush(bar)

    def _flush(self, bar) -> None:
        if not self.pending:
            return
        frames = [f for f, _ in self.pending]
        restored = restore_frames(self.runner, frames, self.tile, self.overlap)
        tb = self.vin.time_base
        for (orig, pts), out in zip(self.pending, restored):
            self.writers[0].write(out, pts, tb)
            if len(self.writers) > 1:
                self.writers[1].write(side_by_side(Decoded(orig), Decoded(out)).rgb, pts, tb)
        self.written += len(self.pending)
        bar.update(len(self.pending))
        self.pending = []


def _keep(tmp: Path, path: Path) -> Path:
    """Moves a finished temporary onto ``path`` (what ``atomic_path`` does on success)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return path


def _why(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return first_line(text) or type(e).__name__
