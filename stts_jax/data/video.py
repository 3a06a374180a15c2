"""Decode videos with PyAV and sample frames as Molmo2 does.

Two samplers choose which frames of a clip the model sees (`sample_frame_indices`):

  uniform_last_frame  the original Molmo2 code's sampler (and vLLM's), which the released checkpoints were
                      trained with: a clip no longer than (num_frames - 1) / max_fps seconds is sampled at
                      max_fps (round(arange(0, total - 1, fps / max_fps))) plus its last frame; a longer clip
                      takes linspace(0, total - 1, num_frames) truncated to ints. Default.
  transformers        transformers' `Molmo2VideoProcessor.sample_frames`: arange(0, total, total / target)
                      truncated, target = num_frames capped at duration * max_fps when fps > max_fps. The last
                      frame is not forced. Kept for parity tests against transformers.

Both return at most `num_frames` indices. The training pipeline needs a static frame count, so
`static_frame_indices` stretches a shorter selection to exactly `num_frames` by repeating frames evenly
(each chosen frame appears floor or ceil of num_frames / n times, in order; their timestamps repeat too).

Every problem with a file raises `VideoDecodeError` whose message starts with the file's name and whose
`kind` says what went wrong: unreadable (missing, a directory, no permission), corrupt (not a video
container), no_video_stream (e.g. audio-only), no_frames (a video stream with nothing decodable),
truncated (fewer frames decode than the container declares), too_large (over the decode limits).

Decode limits (`DecodeLimits`, the defaults of every decoding function, so prepare, the pipeline, eval and
predict all get them): the declared frame size, frame count and duration are checked before anything is
decoded, and each decoded frame's size again before it is converted (a stream may change resolution). The
defaults accept 4K (3840x2160, 4096x2160) and refuse a decompression bomb (a 50 KiB H.264 file at 4096x4096
decodes to ~1 GiB of frames).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Union

import numpy as np

from stts_jax.config import SAMPLERS

ERROR_KINDS = ("unreadable", "corrupt", "no_video_stream", "no_frames", "truncated", "too_large", "timeout", "crashed")


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """What a video may hold; larger ones are refused (VideoDecodeError kind "too_large") before decoding."""

    max_pixels: int = 9_000_000  # per frame: 4096x2160 (8.8 MP) passes, 4096x4096 (16.8 MP) does not
    max_frames: int = 1_080_000  # 10 hours at 30 fps
    max_duration_s: float = 36_000.0  # 10 hours


DEFAULT_LIMITS = DecodeLimits()

VideoSource = Union[str, os.PathLike, bytes]


class VideoDecodeError(ValueError):
    """A video file cannot be decoded; the message starts with the file's name, `kind` is one of ERROR_KINDS."""

    def __init__(self, name: str, kind: str, detail: str):
        super().__init__(f"{name}: {detail}")
        self.name, self.kind, self.detail = name, kind, detail

    def __reduce__(self):  # picklable across Grain worker processes
        return (VideoDecodeError, (self.name, self.kind, self.detail))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about its (first) video stream."""

    num_frames: int  # declared frame count (counted from packets when the container does not say)
    fps: float  # average frame rate (0.0 when unknown)
    width: int
    height: int

    @property
    def duration(self) -> float:
        """Returns num_frames / fps (the duration Molmo2's samplers use), 0 when fps is unknown."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class DecodedClip:
    """Sampled frames of one clip with their source indices and timestamps (seconds)."""

    frames: np.ndarray | list  # uint8 [T, H, W, 3]; a list of [H_t, W_t, 3] when the stream changes resolution
    indices: np.ndarray  # int64 [T] frame index in the file
    timestamps: np.ndarray  # float64 [T] = index / fps
    info: VideoInfo


def _name(src: VideoSource, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)


def _open(src: VideoSource, name: str):
    """Returns an open PyAV input container, or raises VideoDecodeError (unreadable / corrupt)."""
    import av

    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoDecodeError(name, "corrupt", "empty file (0 bytes)")
        target = io.BytesIO(bytes(src))
    else:
        target = os.fspath(src)
        if not os.path.exists(target):
            raise VideoDecodeError(name, "unreadable", "cannot read the file: no such file")
        if os.path.isdir(target):
            raise VideoDecodeError(name, "unreadable", "cannot read the file: it is a directory")
        if not os.path.isfile(target):  # reading a FIFO or a device could block or never end
            raise VideoDecodeError(name, "unreadable", "cannot read the file: not a regular file (a FIFO, device "
                                   "or socket)")
        if not os.access(target, os.R_OK):
            raise VideoDecodeError(name, "unreadable", "cannot read the file: permission denied")
        if os.path.getsize(target) == 0:
            raise VideoDecodeError(name, "corrupt", "empty file (0 bytes)")
    try:
        return av.open(target)
    except OSError as e:  # av.error.FileNotFoundError, PermissionError, ... subclass OSError
        if isinstance(e, av.error.FFmpegError) and not isinstance(
                e, (av.error.FileNotFoundError, av.error.PermissionError, av.error.IsADirectoryError)):
            raise VideoDecodeError(name, "corrupt",
                                   f"not a readable video container, corrupt or truncated ({e})") from None
        raise VideoDecodeError(name, "unreadable", f"cannot read the file ({e})") from None
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise VideoDecodeError(name, "corrupt", f"not a readable video container, corrupt or truncated ({e})") from None


def _video_stream(container, name: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoDecodeError(name, "no_video_stream",
                               f"no video stream (streams found: {', '.join(kinds)}; audio-only file?)")
    return container.streams.video[0]


def _info(container, stream) -> VideoInfo:
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    count = int(stream.frames or 0)
    if count <= 0:  # container does not declare a count (mkv, webm, ...): count packets, no decoding
        count = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    return VideoInfo(num_frames=count, fps=fps, width=int(stream.width or 0), height=int(stream.height or 0))


def _stream_info(container, stream, name: str) -> VideoInfo:
    """Returns `_info`, with a stream that cannot be read reported as a corrupt video naming the file."""
    import av

    try:
        return _info(container, stream)
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoDecodeError(name, "corrupt", f"cannot read the video stream ({e})") from None


def check_limits(info: VideoInfo, name: str, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Raises VideoDecodeError ("too_large") when the declared frame size, frame count or duration is over `limits`."""
    if info.width * info.height > limits.max_pixels:
        raise VideoDecodeError(name, "too_large", f"frames of {info.width}x{info.height} = "
                               f"{info.width * info.height / 1e6:.1f} megapixels, over the limit of "
                               f"{limits.max_pixels / 1e6:.1f} (DecodeLimits.max_pixels)")
    if info.num_frames > limits.max_frames:
        raise VideoDecodeError(name, "too_large", f"{info.num_frames} frames, over the limit of {limits.max_frames} "
                               "(DecodeLimits.max_frames)")
    if info.fps > 0 and info.duration > limits.max_duration_s:
        raise VideoDecodeError(name, "too_large", f"{info.duration:.0f} s long, over the limit of "
                               f"{limits.max_duration_s:.0f} s (DecodeLimits.max_duration_s)")


def probe_video(src: VideoSource, name: str | None = None, limits: DecodeLimits = DEFAULT_LIMITS) -> VideoInfo:
    """Returns the VideoInfo of a file / bytes without decoding frames; raises VideoDecodeError (also over
    `limits`)."""
    name = _name(src, name)
    container = _open(src, name)
    with container:
        info = _stream_info(container, _video_stream(container, name), name)
    if info.num_frames == 0:
        raise VideoDecodeError(name, "no_frames", "the video stream holds no frames")
    check_limits(info, name, limits)
    return info


def sample_frame_indices(total: int, fps: float, num_frames: int, max_fps: float | None = 2.0,
                         mode: str = "uniform_last_frame") -> np.ndarray:
    """Returns int64 frame indices (at most num_frames, increasing) that Molmo2 samples from a clip.

    `total` frames at `fps` (duration = total / fps); see the module docstring for the two modes.
    """
    if total <= 0 or num_frames <= 0:
        raise ValueError(f"need total > 0 and num_frames > 0, got total={total}, num_frames={num_frames}")
    if mode == "uniform_last_frame":
        if max_fps is None or fps <= 0:
            return np.linspace(0, total - 1, num=min(num_frames, total), endpoint=True).astype(np.int64)
        if total <= 2:
            return np.arange(total, dtype=np.int64)
        duration = total / fps
        if duration > (num_frames - 1) / max_fps:  # long clip: uniform, first and last frame included
            return np.linspace(0, total - 1, num=min(num_frames, total), endpoint=True).astype(np.int64)
        float_indices = np.arange(0.0, total - 1, float(fps / max_fps))
        if np.round(float_indices[-1]) != total - 1:
            float_indices = np.concatenate([float_indices, [total - 1]])
        return np.round(float_indices).astype(np.int64)[:num_frames]
    if mode == "transformers":
        fps_eff = fps if fps > 0 else (max_fps or 1.0)  # transformers falls back to max_fps when fps is unknown
        target = num_frames
        if max_fps is not None and fps_eff > max_fps:
            target = min(target, int(total / fps_eff * max_fps))
        target = max(min(target, total), 1)
        step = total / target
        count = int(np.ceil(total / step))  # torch.arange(0, total, step): float32 values from a float64 ramp
        return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)
    raise ValueError(f"unknown frame sampler {mode!r}; expected one of {SAMPLERS}")


def static_frame_indices(indices: np.ndarray, num_frames: int) -> np.ndarray:
    """Returns exactly num_frames indices: `indices` with frames repeated evenly (or thinned evenly if longer)."""
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    if n == 0:
        raise ValueError("no frame indices to stretch")
    if n >= num_frames:
        return indices[np.round(np.linspace(0, n - 1, num_frames)).astype(np.int64)]
    return indices[(np.arange(num_frames) * n) // num_frames]


def uniform_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Returns `num_frames` indices spread evenly over [0, total-1], first and last included (rounded)."""
    if total <= 0 or num_frames <= 0:
        raise ValueError(f"need total > 0 and num_frames > 0, got total={total}, num_frames={num_frames}")
    return np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)


def _rgb(frame, index: int, name: str, limits: DecodeLimits) -> np.ndarray:
    """Returns a decoded frame as uint8 RGB, refusing it ("too_large") before conversion when over the limits."""
    if frame.width * frame.height > limits.max_pixels:
        raise VideoDecodeError(name, "too_large", f"frame {index} is {frame.width}x{frame.height}, over the limit "
                               f"of {limits.max_pixels / 1e6:.1f} megapixels")
    return frame.to_ndarray(format="rgb24")


def _decode_at(container, stream, wanted: np.ndarray, threads: int, name: str = "",
               limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[dict[int, np.ndarray], int, str | None]:
    """Decodes frames in order; returns ({index: rgb frame} for wanted indices, frames decoded, error text).
    A wanted frame over `limits.max_pixels` raises VideoDecodeError before it is converted."""
    import av

    if threads != 1:
        stream.thread_type = "AUTO"
        stream.thread_count = threads
    wanted_set = set(int(i) for i in wanted)
    last = max(wanted_set)
    got: dict[int, np.ndarray] = {}
    count, error = 0, None
    try:
        for frame in container.decode(stream):
            if count in wanted_set:
                got[count] = _rgb(frame, count, name, limits)
            count += 1
            if count > last:
                break
    except VideoDecodeError:
        raise
    except MemoryError:  # av.error.MemoryError too: FFmpeg could not allocate (e.g. under a memory cap)
        raise VideoDecodeError(name, "too_large", f"out of memory after decoding {count} frames") from None
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        error = str(e)
    return got, count, error


def _decode_chosen(src: VideoSource, choose, name: str, threads: int,
                   limits: DecodeLimits) -> tuple[dict[int, np.ndarray], np.ndarray, VideoInfo]:
    """Decodes the frames `choose(total, fps)` picks; returns ({index: frame}, chosen indices, info).

    Only the chosen frames are converted to RGB and decoding stops after the last one. A container that declares
    a frame or two more than decode is sampled again over the frames that exist.
    """
    known_total = None  # set when a first pass found slightly fewer decodable frames than declared
    while True:
        container = _open(src, name)
        with container:
            stream = _video_stream(container, name)
            info = _stream_info(container, stream, name)
            if known_total is not None:
                info = dataclasses.replace(info, num_frames=known_total)
            if info.num_frames == 0:
                raise VideoDecodeError(name, "no_frames", "the video stream holds no frames")
            check_limits(info, name, limits)
            chosen = choose(info.num_frames, info.fps)
            wanted = np.unique(chosen)
            got, decoded, error = _decode_at(container, stream, wanted, threads, name, limits)
        if len(got) == len(wanted):
            return got, chosen, info
        if decoded == 0:
            detail = f"the video stream declares {info.num_frames} frames but none decodes"
            raise VideoDecodeError(name, "no_frames", detail + (f" ({error})" if error else ""))
        slack = max(1, info.num_frames // 100)  # real files sometimes declare a frame or two more than they hold
        if known_total is not None or info.num_frames - decoded > slack:
            detail = f"truncated: the container declares {info.num_frames} frames but only {decoded} decode"
            raise VideoDecodeError(name, "truncated", detail + (f" ({error})" if error else ""))
        known_total = decoded  # resample over the frames that really exist


def _frames(got: dict[int, np.ndarray], chosen: np.ndarray) -> np.ndarray | list:
    frames = [got[int(i)] for i in chosen]
    if len({f.shape for f in frames}) == 1:
        return np.stack(frames)
    return frames  # the stream changed resolution mid-way: the caller resizes frame by frame


def decode_clip(src: VideoSource, num_frames: int, *, max_fps: float | None = 2.0,
                sampler: str = "uniform_last_frame", static: bool = True, name: str | None = None,
                threads: int = 1, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedClip:
    """Returns the frames Molmo2 samples from a video file / bytes (exactly num_frames if `static`).

    Only the sampled frames are converted to RGB; decoding stops after the last one. Raises
    VideoDecodeError (see module docstring) naming the file.
    """
    name = _name(src, name)
    got, chosen, info = _decode_chosen(
        src, lambda total, fps: sample_frame_indices(total, fps, num_frames, max_fps, sampler), name, threads, limits)
    if static:
        chosen = static_frame_indices(chosen, num_frames)
    fps = info.fps if info.fps > 0 else (max_fps or 1.0)
    if sampler == "transformers":  # transformers divides an int32 tensor by fps: float32 timestamps
        timestamps = chosen.astype(np.float32) / np.float32(fps)
    else:
        timestamps = chosen / fps
    return DecodedClip(frames=_frames(got, chosen), indices=chosen, timestamps=timestamps, info=info)


def decode_uniform(src: VideoSource, num_frames: int, *, name: str | None = None, threads: int = 1,
                   limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedClip:
    """Returns `num_frames` frames spread evenly over the whole video (`uniform_frame_indices`, first and last
    included), decoding only up to the last of them: what inference on a long video needs, in the memory of the
    sampled frames, not of the video. Timestamps are index / fps (index when fps is unknown)."""
    name = _name(src, name)
    got, chosen, info = _decode_chosen(src, lambda total, fps: uniform_frame_indices(total, num_frames), name,
                                       threads, limits)
    return DecodedClip(frames=_frames(got, chosen), indices=chosen, timestamps=chosen / (info.fps or 1.0), info=info)


def decode_frames(path: VideoSource, max_frames: int | None = None,
                  limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, float]:
    """Returns (frames uint8 [T, H, W, 3], fps) of every decoded frame (or the first `max_frames`); for short
    clips only (every frame is held in memory: `decode_uniform` samples a long video)."""
    import av

    name = _name(path, None)
    container = _open(path, name)
    frames = []
    with container:
        stream = _video_stream(container, name)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        check_limits(_stream_info(container, stream, name), name, limits)
        try:
            for frame in container.decode(stream):
                frames.append(_rgb(frame, len(frames), name, limits))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except VideoDecodeError:
            raise
        except (av.error.FFmpegError, ValueError, IndexError) as e:
            if not frames:
                raise VideoDecodeError(name, "no_frames", f"no frame decodes ({e})") from None
            raise VideoDecodeError(name, "truncated", f"decoding failed after {len(frames)} frames ({e})") from None
    if not frames:
        raise VideoDecodeError(name, "no_frames", "no video frames decoded")
    return np.stack(frames), fps
