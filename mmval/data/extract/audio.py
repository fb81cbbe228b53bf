"""Audio decoding with PyAV and the two spectrograms the reference recipes use.

`kaldi_fbank` is the Kinetics-Sounds/AST feature; `stft_spectrogram` covers OGM-GE's CREMA-D and
VGGSound loaders and GeWu-Lab's preprocessing tool (MM-Debiased) (docs/data.md#audio-features);
each follows the reference code step for step so that published numbers stay comparable.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
import torchaudio

from mmval.data.extract import ExtractionError
from mmval.data.extract.video import open_media


def read_audio(
    path: Path,
    *,
    sample_rate: int | None = None,
    mono: bool = True,
    start: float = 0.0,
    end: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of `path` to float32 [C, T] in [-1, 1] and its sample rate.

    Samples are clipped to [-1, 1] because the reference pipelines read 16-bit PCM written by
    ffmpeg, which saturates there (AAC decodes can overshoot slightly). `start`/`end` (seconds)
    count from the first decoded sample, as librosa's offset/duration do. `mono` averages the
    channels into [1, T]. When `sample_rate` differs from the stream's, the (trimmed) wave is
    resampled with torchaudio's band-limited sinc resampler.
    """
    with open_media(path) as container:
        decoder = AudioDecoder(start=start, end=end)
        stream = decoder.stream(container)
        try:
            for packet in container.demux(stream):
                decoder.take(packet)
        except av.FFmpegError as exc:
            raise ExtractionError(f"undecodable: {exc.strerror or exc}") from exc
    return decoder.wave(sample_rate=sample_rate, mono=mono)


class AudioDecoder:
    """`read_audio`'s decoding, fed one packet at a time: by its own demux pass, or by a
    video reader's (`read_video_frames(..., also=...)`), so that a clip whose frames and sound
    share a file is opened and demuxed once. The packets must end with the demuxer's empty
    flush packet (as `container.demux` yields them), which drains the decoder; `wave` once
    all are taken."""

    def __init__(self, *, start: float = 0.0, end: float | None = None) -> None:
        self._start, self._end = start, end
        self._chunks: list[list[np.ndarray]] = []  # per frame, one array per channel
        self._decoded = 0
        self._last: int | None = None
        self._done = False

    def stream(self, container: av.container.InputContainer) -> av.AudioStream:
        """The stream to feed: the container's first audio stream."""
        if not container.streams.audio:
            raise ExtractionError("no audio stream")
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        self._rate = stream.codec_context.sample_rate
        if not self._rate:
            raise ExtractionError("audio stream without a sample rate")
        self._last = None if self._end is None else round(self._end * self._rate)
        self._to_float = av.AudioResampler(format="fltp")  # passes fltp frames through
        return stream

    def take(self, packet: av.Packet) -> None:
        """Decode one packet of the stream; packets past `end` are not decoded."""
        if self._done:
            return
        for frame in packet.decode():
            for converted in self._to_float.resample(frame):
                self._chunks.append(_channels(converted))
                self._decoded += converted.samples
            if self._last is not None and self._decoded >= self._last:
                self._done = True
                return

    def wave(self, *, sample_rate: int | None, mono: bool) -> tuple[np.ndarray, int]:
        """The decoded wave in [start, end), clipped, averaged to mono and resampled as
        `read_audio` says."""
        if not self._done:  # the stream ended before `end`: drain the converter
            self._chunks.extend(_channels(f) for f in self._to_float.resample(None))
            self._done = True
        if not self._chunks:
            raise ExtractionError("no audio samples")
        rate = self._rate
        first = round(self._start * rate)
        channels = [np.concatenate(channel) for channel in zip(*self._chunks, strict=True)]
        wave = channels[0][None] if len(channels) == 1 else np.stack(channels)
        wave = wave[:, first : self._last]
        if wave.shape[1] == 0:
            raise ExtractionError(f"no audio samples in [{self._start}, {self._end}) s")
        wave = np.clip(wave, -1.0, 1.0, dtype=np.float32)
        if mono and len(wave) > 1:  # the mean of one channel is that channel, bit for bit
            wave = wave.mean(axis=0, keepdims=True)
        if sample_rate is not None and sample_rate != rate:
            with torch.no_grad():
                wave = _resampler(rate, sample_rate)(torch.from_numpy(wave)).numpy()
            rate = sample_rate
        return np.ascontiguousarray(wave, dtype=np.float32), rate


def _channels(frame: av.AudioFrame) -> list[np.ndarray]:
    """The samples of a planar float32 frame, one array per channel, read from its planes
    (the same values as `to_ndarray`, which stacks the planes with numpy on every frame)."""
    return [np.frombuffer(plane, np.float32, frame.samples) for plane in frame.planes]


@functools.lru_cache(maxsize=8)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    """`torchaudio.functional.resample(wave, orig, new)` with its sinc kernel built once per
    pair of rates instead of on every call (bit-identical: the same kernel function, float32)."""
    return torchaudio.transforms.Resample(orig, new, dtype=torch.float32)


def kaldi_fbank(
    wave: np.ndarray,
    sample_rate: int,
    *,
    num_mel_bins: int = 128,
    frame_shift_ms: float = 10.0,
    target_frames: int = 1024,
    mean: float = -4.503877,
    std: float = 5.141276,
) -> np.ndarray:
    """Log-mel filterbank of the Kinetics-Sounds reference (OGM-GE `process_audio.py`).

    As there: the mean of the whole wave (all channels) is removed, channel 0 goes through
    `torchaudio.compliance.kaldi.fbank` (Hann window, htk_compat, no energy, no dither), rows are
    zero-padded or cropped to `target_frames`, then normalised as `(fb - mean) / (2 * std)` (the
    defaults are the KS statistics). Returns float32 [target_frames, num_mel_bins].
    """
    w = torch.as_tensor(wave, dtype=torch.float32)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2:
        raise ValueError(f"expected a wave [T] or [C, T], got shape {tuple(wave.shape)}")
    w = w - w.mean()
    fb = torchaudio.compliance.kaldi.fbank(
        w[:1],
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=frame_shift_ms,
    )
    fb = torch.nn.functional.pad(fb, (0, 0, 0, max(target_frames - fb.shape[0], 0)))
    fb = fb[:target_frames]
    return ((fb - mean) / (std * 2)).numpy().astype(np.float32, copy=False)


def stft_spectrogram(
    wave: np.ndarray,
    sample_rate: int,
    *,
    n_fft: int = 512,
    hop_length: int = 353,
    seconds: float = 3.0,
    offset: float = 0.0,
    tile: bool = True,
    repeat: Literal["all", "last_second"] = "all",
    pad_mode: Literal["constant", "reflect"] = "constant",
    log: bool = True,
) -> np.ndarray:
    """STFT magnitude of a fixed length of audio, [n_fft // 2 + 1, frames], log by default.

    OGM-GE's CREMA-D and VGGSound loaders (the defaults; CREMA-D: `librosa.load(sr=22050)`;
    `np.tile(x, 3)[:66150]`; clip to [-1, 1]; `librosa.stft(n_fft=512, hop_length=353)`;
    `log(|S| + 1e-7)`): the mono wave, already at `sample_rate`, is repeated until it covers
    `offset + seconds` (zero-padded instead when `tile` is False), and the `seconds *
    sample_rate` samples from `offset` on are kept. VGGSound's loader doubles the wave until it
    lasts 10 s and crops 5 s from a random start in [0, 5] s; the repeats are periodic either
    way, so a fixed `offset` gives that crop without the doubling. The STFT is centred with a
    periodic Hann window and no normalisation. 3 s at 22050 Hz gives [257, 188]; 5 s at 16 kHz,
    n_fft 256, hop 128 [129, 626].

    GeWu-Lab's AV_preprocess_tool (`audio_2_frames.py`: `wav_fixed`, then
    `np.abs(librosa.stft(wav, 512, hop_length=440, center=True, pad_mode='reflect'))`, stored
    as is) is `repeat="last_second"` (the wave's last partial second, or its last second when it
    has no partial one, is appended until the length is reached), `pad_mode="reflect"` and
    `log=False`; 10 s at 44.1 kHz gives [257, 1003].
    """
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty mono wave [T] or [1, T], got {np.shape(wave)}")
    first, n = round(offset * sample_rate), round(seconds * sample_rate)
    total = first + n
    if not tile:
        x = np.pad(x, (0, max(total - x.size, 0)))
    elif repeat == "all":
        x = np.tile(x, math.ceil(total / x.size))
    elif x.size < total:
        piece = x[x.size - (x.size % sample_rate or sample_rate) :]
        x = np.concatenate([x, np.tile(piece, math.ceil((total - x.size) / piece.size))])
    x = np.clip(x[first:total], -1.0, 1.0)
    spec = torch.stft(
        torch.from_numpy(x),
        n_fft=n_fft,
        hop_length=hop_length,
        window=torch.hann_window(n_fft, periodic=True),
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    ).abs()
    return (torch.log(spec + 1e-7) if log else spec).numpy()
