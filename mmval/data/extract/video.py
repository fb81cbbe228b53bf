"""Frame sampling from video files with PyAV, JPEG coding, and the reference segment picker.

Decoding is the dominant cost of `mmval prep` (docs/data.md#preparation-cost): frames are decoded
in-process, only the kept ones are converted to RGB (and resized in the same swscale call), decoding
stops after the last needed frame, the decoder seeks only when a keyframe lies between the
current position and the next target (seeking on every target re-decodes whole GOPs), and it
skips the frames that are neither kept nor referenced by another frame (B-frames, mostly: about
half the frames of an x264 clip). Which frames can be kept is known from the demux pass, so the
skipping changes no output; where a file's frames do not carry their packets' timestamps the
clip is decoded again without it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _tv_decode_jpeg
from torchvision.io import encode_jpeg as _tv_encode_jpeg

from mmval.data.extract import ExtractionError

# Importing torchvision routes FFmpeg's log through PyAV's Python callback (set_level(ERROR)). A
# frame-threaded decoder thread that logs then waits for the GIL while the main thread, holding
# it, waits for that thread: a deadlock, seen here about once in ten test runs (PyAV issue
# #1849). PyAV's own default, no Python log callback, avoids it; error messages stay in the
# exceptions' strerror.
av.logging.set_level(None)

_EPS = 1e-6  # seconds: absorbs float error when a frame lies exactly on a target
# The video packets of a file up to this size are held in memory by the pass that indexes them
# and decoded from there: no second demux of the file (1.5 ms of a 10-s clip's 30 of decoding)
# and exact "seeks". A larger file is demuxed again and sought in.
HOLD_PACKETS_MAX_BYTES = 64 << 20


_decoder_threads = 0  # 0: FFmpeg picks (frame threads on every core)


def set_decoder_threads(count: int) -> None:
    """Process-wide: 1 makes the decoder single-threaded, for pool workers that already keep
    every core busy with one clip each; 0 lets FFmpeg use frame threads on every core."""
    global _decoder_threads
    _decoder_threads = count


_local = threading.local()


def _reformatter() -> VideoReformatter:
    """This thread's swscale converter. `VideoFrame.to_ndarray(width=...)` makes one per frame,
    and building the area filter (and slice threads) of a fresh context cost more than the
    conversion itself; one kept per thread is reused while the sizes and formats stay the same
    (the same output). It scales on one thread (a 224 x 224 frame is small): a context with
    slice threads, inherited by a forked pool worker, would wait forever on threads the worker
    does not have."""
    if not hasattr(_local, "reformatter"):
        _local.reformatter = VideoReformatter()
    return _local.reformatter


def to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded frame as uint8 RGB [H, W, 3], resized to `size` (height, width; None keeps
    it) with area interpolation in the same swscale call."""
    height, width = size if size is not None else (None, None)
    rgb = _reformatter().reformat(
        frame, width=width, height=height, format="rgb24", interpolation="AREA", threads=1
    )
    return rgb.to_ndarray()


@dataclass
class VideoFrames:
    frames: np.ndarray  # uint8 [N, H, W, 3] RGB
    times: np.ndarray  # float32 [N], seconds from the start of the video stream
    duration: float  # seconds, of the video stream


@dataclass
class _StreamIndex:
    """What one demux-only pass tells about a video stream."""

    keyframe_pts: list[int]  # sorted
    keyframes: list[float]  # the same, in seconds from the start of the stream
    origin: int  # pts of time 0
    duration: float  # seconds
    frame_pts: list[int]  # every packet's pts, sorted: the frames a full decode gives
    frame_times: list[float]  # the same, in seconds


class PacketSink(Protocol):
    """Takes the packets of another stream of the file a video reader demuxes (the sound of a
    clip), so that the file is opened and demuxed once for both (`AudioDecoder`)."""

    def stream(self, container: av.container.InputContainer) -> av.stream.Stream: ...

    def take(self, packet: av.Packet) -> None: ...


def open_media(path: Path) -> av.container.InputContainer:
    """Open a media file, turning every way it can be unreadable into an ExtractionError."""
    if not path.is_file():
        raise ExtractionError("missing file")
    if path.stat().st_size == 0:
        raise ExtractionError("empty file (0 bytes)")
    try:
        return av.open(str(path))
    except av.FFmpegError as exc:
        raise ExtractionError(f"undecodable: {exc.strerror or exc}") from exc


def read_video_frames(
    path: Path,
    *,
    fps: float = 1.0,
    position: Literal["start", "center"] = "start",
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    start: float = 0.0,
    end: float | None = None,
    also: PacketSink | None = None,
) -> VideoFrames:
    """Sample frames at `fps` from the first video stream of `path`.

    Target i is `start + i/fps` for "start" (keep the first frame at or after it, as the OGM-GE
    dumper keeps the first frame of each second) or `start + (i + 0.5)/fps` for "center" (keep the
    frame nearest to it, as GeWu-Lab/AV_preprocess_tool; ties go to the earlier frame). Targets
    stop before `end` (exclusive) and the end of the stream, and after `max_frames`; frames outside
    [start, end) are never kept. A frame serves every target it satisfies, so an `fps` above the
    source rate repeats frames (like ffmpeg's fps filter). `size` is (height, width) of the
    returned frames (area interpolation); None keeps the source size. Times are relative to the
    start of the video stream. `also` is given every packet of the stream it names, all of
    them, from the pass that indexes the video stream.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if position not in ("start", "center"):
        raise ValueError(f"position must be 'start' or 'center', got {position!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    try:
        with _Cursor(path, start, end, also) as cursor:
            stop = cursor.index.duration if end is None else min(end, cursor.index.duration)
            offset = 0.5 if position == "center" else 0.0
            targets: list[float] = []
            while max_frames is None or len(targets) < max_frames:
                target = start + (len(targets) + offset) / fps
                if target >= stop:
                    break
                targets.append(target)
            cursor.needed = _candidates(cursor.index, targets, position, start, end)
            kept = _pick_frames(cursor, targets, position)
            if not cursor.skipping_was_safe():
                cursor.needed = None
                cursor.rewind()
                kept = _pick_frames(cursor, targets, position)
            if not kept:
                raise ExtractionError("no video frames")
            arrays: list[np.ndarray] = []
            for i, (frame, _) in enumerate(kept):
                if i > 0 and frame is kept[i - 1][0]:  # a repeated frame is converted once
                    arrays.append(arrays[-1])
                    continue
                arrays.append(to_rgb(frame, size))
    except av.FFmpegError as exc:
        raise ExtractionError(f"undecodable: {exc.strerror or exc}") from exc
    times = np.array([t for _, t in kept], dtype=np.float32)
    return VideoFrames(frames=np.stack(arrays), times=times, duration=cursor.index.duration)


def _candidates(
    index: _StreamIndex,
    targets: list[float],
    position: Literal["start", "center"],
    start: float,
    end: float | None,
) -> set[int]:
    """The pts of every frame `_pick_frames` may keep: for each target the first frame at or
    after it and, for "center", the last one before it (among the frames in [start, end))."""
    times, lo = index.frame_times, bisect.bisect_left(index.frame_times, start - _EPS)
    hi = len(times) if end is None else bisect.bisect_left(times, end)
    found: set[int] = set()
    for target in targets:
        at = bisect.bisect_left(times, target - _EPS, lo, hi)
        if at < hi:
            found.add(index.frame_pts[at])
        if position == "center" and at > lo:
            found.add(index.frame_pts[at - 1])
    return found


class _Cursor:
    """Decodes the video frames in [start, end) in order, seeking forward to keyframes on request.

    A file of at most HOLD_PACKETS_MAX_BYTES keeps its video packets from the demux pass and is
    decoded from them, from any keyframe on. A larger one is sought in, and some containers
    (MPEG-TS, raw streams) seek inexactly and land after the requested keyframe; when that
    happens the file is reopened, decoded from its beginning, and never sought again. With
    `needed` (pts), a packet whose pts is not in it is decoded with skip_frame=NONREF: FFmpeg
    drops it if no other frame refers to it, so it never comes out.
    """

    def __init__(
        self, path: Path, start: float, end: float | None, also: PacketSink | None = None
    ) -> None:
        self._path = path
        self._start = start
        self._end = end
        self._container = self._open()
        self._frames: Iterator[av.VideoFrame] | None = None
        self._seekable = True
        self._landing: float | None = None  # where the last seek must land, until checked
        self.position = -math.inf  # time of the last decoded frame
        self._skipping = _Skipping()
        small = path.stat().st_size <= HOLD_PACKETS_MAX_BYTES
        self._held: list[av.Packet] | None = [] if small else None  # in decoding order
        self._held_keyframes: list[int] = []  # where each keyframe is in _held
        try:
            self.index = self._index_stream(also)
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> _Cursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._container.close()

    def _open(self) -> av.container.InputContainer:
        container = open_media(self._path)
        if not container.streams.video:
            container.close()
            raise ExtractionError("no video stream")
        stream = container.streams.video[0]
        base = stream.time_base
        if base is None:
            container.close()
            raise ExtractionError("video stream without a time base")
        self._base = (base.numerator, base.denominator)
        if _decoder_threads == 1:
            stream.thread_count = 1
        else:
            stream.thread_type = "AUTO"
        return container

    @property
    def _stream(self) -> av.VideoStream:
        return self._container.streams.video[0]

    @property
    def started(self) -> bool:
        return self._frames is not None

    def _index_stream(self, also: PacketSink | None) -> _StreamIndex:
        """Demux (no decoding) the whole stream for its frames, keyframes and true duration,
        handing `also` the packets of its stream on the way."""
        stream = self._stream
        streams = [stream] if also is None else [stream, also.stream(self._container)]
        keyframe_pts: list[int] = []
        frame_pts: list[int] = []
        first_pts: int | None = None
        end_pts: int | None = None
        rate = stream.average_rate or stream.guessed_rate
        step = round(1 / (rate * stream.time_base)) if rate else 0  # packets without a duration
        held_at: dict[int, int] = {}  # keyframe pts -> position in _held
        index = stream.index
        for packet in self._container.demux(*streams):
            if also is not None and packet.stream_index != index:
                also.take(packet)
                continue
            pts, key = packet.pts, packet.is_keyframe  # (each read asks FFmpeg again)
            if self._held is not None and packet.size:  # not the demuxer's empty last packet
                if key and pts is not None:
                    held_at[pts] = len(self._held)
                self._held.append(packet)
            if pts is None:
                continue
            if key:
                keyframe_pts.append(pts)
            frame_pts.append(pts)
            first_pts = pts if first_pts is None else min(first_pts, pts)
            packet_end = pts + (packet.duration or step)
            end_pts = packet_end if end_pts is None else max(end_pts, packet_end)
        if first_pts is None or end_pts is None:
            raise ExtractionError("no video frames")
        origin = stream.start_time if stream.start_time is not None else first_pts
        self._origin = origin
        keyframe_pts.sort()
        frame_pts.sort()
        self._held_keyframes = [held_at[pts] for pts in keyframe_pts] if held_at else []
        return _StreamIndex(
            keyframe_pts=keyframe_pts,
            keyframes=[self._seconds(pts) for pts in keyframe_pts],
            origin=origin,
            duration=self._seconds(end_pts),
            frame_pts=frame_pts,
            frame_times=[self._seconds(pts) for pts in frame_pts],
        )

    def _seconds(self, pts: int) -> float:
        """Seconds from the stream's start: float((pts - origin) * time_base), without the
        Fraction objects (slow per frame); integer arithmetic and one correctly rounded division
        give the same float."""
        return (pts - self._origin) * self._base[0] / self._base[1]

    def restart(self, k: int) -> bool:
        """Decode from keyframe k (from the beginning when k < 0); False if that is not possible.

        A seek is trusted only once its first frame shows it landed on the keyframe.
        """
        if self._held is not None:
            self._decode_held(0 if k < 0 else self._held_keyframes[k])
            return True
        if k < 0:
            self._reopen(seekable=self._seekable)
            return True
        if not self._seekable:
            return False
        self._container.seek(
            self.index.keyframe_pts[k], stream=self._stream, backward=True, any_frame=False
        )
        self._frames = _decoded_frames(self._demuxed(), self._stream, self._skipping)
        self._landing = self.index.keyframes[k]
        self.position = -math.inf
        return True

    @property
    def needed(self) -> set[int] | None:
        """The pts that must be decoded; None: every frame."""
        return self._skipping.needed

    @needed.setter
    def needed(self, pts: set[int] | None) -> None:
        self._skipping.needed = pts

    def rewind(self) -> None:
        """Decode again from the beginning of the file."""
        if self._held is not None:
            self._decode_held(0)
        else:
            self._reopen(seekable=self._seekable)

    def _decode_held(self, first: int) -> None:
        """Decode the held packets from position `first` (a keyframe's) on, and flush."""
        assert self._held is not None
        self._stream.codec_context.flush_buffers()
        packets = itertools.chain(itertools.islice(self._held, first, None), [None])
        self._frames = _decoded_frames(packets, self._stream, self._skipping)
        self._landing = None
        self.position = -math.inf

    def _demuxed(self) -> Iterator[av.Packet]:
        return self._container.demux(self._stream)

    def _reopen(self, *, seekable: bool) -> None:
        self._container.close()
        self._container = self._open()
        self._frames = _decoded_frames(self._demuxed(), self._stream, self._skipping)
        self._seekable = seekable
        self._landing = None
        self.position = -math.inf

    def skipping_was_safe(self) -> bool:
        """Whether a decode with `needed` kept what a full decode keeps: every frame decoded
        has a packet's pts (frames carry their packets' timestamps, so skipping by packet
        skipped the intended frames), and every needed frame within the span of a run of
        decoding (from a (re)start to its last frame) came out: none of them was skipped."""
        needed, runs = self._skipping.needed, self._skipping.runs
        if needed is None:
            return True
        known = set(self.index.frame_pts)
        spans: list[tuple[int, int]] = []
        for run in runs:
            pts = [p for p in run if p is not None]
            if len(pts) < len(run) or not known.issuperset(pts):
                return False
            if pts:
                spans.append((min(pts), max(pts)))
        decoded = {p for run in runs for p in run}
        return all(p in decoded for p in needed if any(a <= p <= b for a, b in spans))

    def next(self) -> tuple[av.VideoFrame, float] | None:
        """The next frame in [start, end) with its time, or None at the end."""
        assert self._frames is not None, "restart before decoding"
        for frame in self._frames:
            if frame.pts is None:
                continue
            time = self._seconds(frame.pts)
            if self._landing is not None:
                if time > self._landing + _EPS:  # the seek overshot: decode from the beginning
                    self._reopen(seekable=False)
                    return self.next()
                self._landing = None
            self.position = time
            if self._end is not None and time >= self._end:
                self._frames = iter(())
                return None
            if time >= self._start - _EPS:
                return frame, time
        return None


@dataclass
class _Skipping:
    """What a cursor's decoding skips (`needed`) and the pts it decoded, per (re)start. Kept
    apart from the cursor so that its frame generators do not refer back to it: that cycle
    would leave the decoder (and its threads) to the garbage collector, perhaps in a forked
    pool worker, where freeing the parent's decoder threads hangs."""

    needed: set[int] | None = None
    runs: list[list[int | None]] = field(default_factory=list)


def _decoded_frames(
    packets: Iterable[av.Packet | None], stream: av.VideoStream, skipping: _Skipping
) -> Iterator[av.VideoFrame]:
    """The frames `stream`'s decoder makes of `packets` (None, or an empty packet, flushes
    it); a packet whose pts is not in `skipping.needed` is decoded with skip_frame=NONREF
    (dropped if no frame refers to it)."""
    context = stream.codec_context
    run: list[int | None] = []
    skipping.runs.append(run)
    for packet in packets:
        if skipping.needed is not None:
            skip = (
                packet is not None and packet.pts is not None and packet.pts not in skipping.needed
            )
            context.skip_frame = "NONREF" if skip else "DEFAULT"
        for frame in context.decode(packet):
            run.append(frame.pts)
            yield frame


def _pick_frames(
    cursor: _Cursor, targets: list[float], position: Literal["start", "center"]
) -> list[tuple[av.VideoFrame, float]]:
    """Decode towards each target in turn, seeking only when a keyframe lies in between."""
    keyframes = cursor.index.keyframes
    kept: list[tuple[av.VideoFrame, float]] = []
    prev: tuple[av.VideoFrame, float] | None = None  # last frame before the target
    last: tuple[av.VideoFrame, float] | None = None  # first frame at or after it
    for target in targets:
        k = bisect.bisect_right(keyframes, target + _EPS) - 1
        seek = not cursor.started or (k >= 0 and keyframes[k] > cursor.position)
        if seek and cursor.restart(k):
            prev = last = None
        while last is None or last[1] < target - _EPS:
            if last is not None:
                prev = last
            last = cursor.next()
            if last is None:
                break
        if position == "start":
            if last is None:
                break
            kept.append(last)
        elif prev is not None and (last is None or target - prev[1] <= last[1] - target + _EPS):
            kept.append(prev)  # nearer, or a tie up to float error: the earlier frame
        elif last is not None:
            kept.append(last)
        else:
            break
    return kept


def encode_jpeg(frames: np.ndarray, quality: int = 90) -> list[bytes]:
    """Encode uint8 [N, H, W, C] images (C = 1 grayscale or 3 RGB) as one JPEG each."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, H, W, 1|3], got {frames.dtype} {frames.shape}")
    chw = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
    return [bytes(t.numpy()) for t in _tv_encode_jpeg(list(chw), quality=quality)]


def decode_jpeg(data: list[bytes]) -> np.ndarray:
    """Decode JPEGs of one shape to uint8 [N, H, W, C]; grayscale JPEGs give C = 1."""
    if not data:
        raise ValueError("no JPEG images to decode")
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    images = _tv_decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
    return np.stack([img.permute(1, 2, 0).numpy() for img in images])


def segment_indices(
    n_frames: int, k: int, *, train: bool, rng: np.random.Generator | None
) -> np.ndarray:
    """Pick k of n_frames kept frames as the GeWu-Lab loaders do (0-based indices).

    The reference splits the frames into k segments of `seg = n_frames // k` and uses 1-indexed
    frame names: test `t_i = i*seg + max(seg // 2, 1)`, train `t_i = randint(i*seg + 1, i*seg +
    seg)` (both ends inclusive). Here `t_i - 1`, clipped to [0, n_frames - 1]. When n_frames < k
    (seg == 0) the formula is undefined, so k evenly spread indices (with repeats) are returned.
    """
    if n_frames < 1 or k < 1:
        raise ValueError(f"need n_frames >= 1 and k >= 1, got n_frames={n_frames}, k={k}")
    seg = n_frames // k
    if seg == 0:
        return np.linspace(0, n_frames - 1, k).round().astype(np.int64)
    first = np.arange(k, dtype=np.int64) * seg + 1  # 1-indexed start of each segment
    if train:
        if rng is None:
            raise ValueError("train=True needs an rng, so that the picks are reproducible")
        one_based = rng.integers(first, first + seg)  # randint(a, a + seg - 1) inclusive
    else:
        one_based = first - 1 + max(seg // 2, 1)
    return np.clip(one_based - 1, 0, n_frames - 1)
