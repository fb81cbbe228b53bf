"""Media extraction on synthetic clips written with PyAV: which frames are kept, spectrograms that
match the reference calls, flow quantisation, JPEG coding and the reference segment picker."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
import torchaudio

from mmval.data.extract import ExtractionError
from mmval.data.extract import video as video_mod
from mmval.data.extract.audio import AudioDecoder, kaldi_fbank, read_audio, stft_spectrogram
from mmval.data.extract.flow import flow_pair_frames, optical_flow
from mmval.data.extract.video import decode_jpeg, encode_jpeg, read_video_frames, segment_indices
from mmval.data.pipeline import ClipTask
from mmval.data.sources import av_clips
from mmval.data.sources.av_clips import AVParams, FbankParams, FramesParams, extract_clip
from mmval.errors import UserError

RATE = 10  # video frames per second
N_FRAMES = 30  # 3 s
SR = 16000


def _level(i: int) -> int:
    """Grey level of synthetic frame i: distinct enough to identify the frame after H.264."""
    return 10 + 8 * i


def _frame_ids(frames: np.ndarray) -> list[int]:
    return [round((float(f.mean()) - 10) / 8) for f in frames]


def _write_clip(path: Path, *, gop: int, audio: bool = True) -> Path:
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=RATE)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        if audio:
            stream_a = out.add_stream("aac", rate=SR, layout="mono")
        for i in range(N_FRAMES):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), _level(i), np.uint8), format="rgb24"
            )
            frame.pts = i
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if audio:
            t = np.arange(N_FRAMES * SR // RATE) / SR
            tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for s in range(0, tone.size, 1024):
                chunk = av.AudioFrame.from_ndarray(
                    tone[None, s : s + 1024], format="fltp", layout="mono"
                )
                chunk.sample_rate, chunk.pts = SR, s
                out.mux(stream_a.encode(chunk))
            out.mux(stream_a.encode(None))
    return path


def _write_wav(path: Path, wave: np.ndarray, rate: int = SR) -> Path:
    """Write int16 PCM; `wave` is float [C, T] in [-1, 1]."""
    pcm = np.round(wave * 32767).astype(np.int16)
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    t = np.arange(SR) / SR
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 880 * t)])
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return {
        "one_key": _write_clip(root / "one_key.mp4", gop=1000),
        "key5": _write_clip(root / "key5.mp4", gop=5),
        "video_only": _write_clip(root / "video_only.mp4", gop=5, audio=False),
        "mono_wav": _write_wav(root / "mono.wav", stereo[:1]),
        "stereo_wav": _write_wav(root / "stereo.wav", stereo),
        "empty": root / "empty.mp4",
        "garbage": root / "garbage.mp4",
    }


def _keyframe_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(p.is_keyframe for p in c.demux(c.streams.video[0]) if p.pts is not None)


def _all_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Sequential decode of every frame: the ground truth the sampler must agree with."""
    with av.open(str(path)) as c:
        decoded = [(f.to_ndarray(format="rgb24"), f.time) for f in c.decode(video=0)]
    return np.stack([a for a, _ in decoded]), np.array([t for _, t in decoded])


def test_pyav_logging_stays_off_despite_torchvision() -> None:
    # the Python log callback deadlocks frame-threaded decoding (see mmval.data.extract.video)
    assert av.logging.get_level() is None


def test_gop_settings_took_effect(clips: dict[str, Path]) -> None:
    assert _keyframe_count(clips["one_key"]) == 1
    assert _keyframe_count(clips["key5"]) == N_FRAMES // 5


@pytest.mark.parametrize("clip", ["one_key", "key5"])
@pytest.mark.parametrize(
    ("position", "ids", "times"),
    [("start", [0, 10, 20], [0.0, 1.0, 2.0]), ("center", [5, 15, 25], [0.5, 1.5, 2.5])],
)
def test_kept_frames_and_times(
    clips: dict[str, Path], clip: str, position: str, ids: list[int], times: list[float]
) -> None:
    v = read_video_frames(clips[clip], position=position)
    assert v.frames.dtype == np.uint8 and v.frames.shape == (3, 48, 64, 3)
    assert _frame_ids(v.frames) == ids
    assert v.times.dtype == np.float32
    np.testing.assert_allclose(v.times, times, atol=1e-6)
    assert v.duration == pytest.approx(3.0)


def test_center_between_frames_takes_nearest(clips: dict[str, Path]) -> None:
    # fps 4: centres at 0.125, 0.375, ... -> nearest 10 fps frames 1 (0.1), 4 (0.4), 6 (0.6), 9
    v = read_video_frames(clips["key5"], fps=4, position="center", max_frames=4)
    assert _frame_ids(v.frames) == [1, 4, 6, 9]
    # at the source rate every centre is a tie between two frames: the earlier one wins
    v = read_video_frames(clips["key5"], fps=RATE, position="center")
    assert _frame_ids(v.frames) == list(range(N_FRAMES))


def test_max_frames_size_start_end(clips: dict[str, Path]) -> None:
    path = clips["key5"]
    assert _frame_ids(read_video_frames(path, max_frames=2).frames) == [0, 10]
    small = read_video_frames(path, size=(24, 32))
    assert small.frames.shape == (3, 24, 32, 3)
    assert _frame_ids(small.frames) == [0, 10, 20]
    window = read_video_frames(path, start=1.0, end=2.5)
    assert _frame_ids(window.frames) == [10, 20]
    np.testing.assert_allclose(window.times, [1.0, 2.0], atol=1e-6)
    centred = read_video_frames(path, position="center", start=1.0, end=2.5)
    assert _frame_ids(centred.frames) == [15]  # the centre 2.5 is not before end
    # targets 0.3, 1.3, 2.3 -> first frames at or after them
    assert _frame_ids(read_video_frames(path, start=0.25).frames) == [3, 13, 23]
    # a frame serves every target it satisfies when fps exceeds the source rate
    assert _frame_ids(read_video_frames(path, fps=20, max_frames=4).frames) == [0, 1, 1, 2]


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[video_mod._Cursor]:
    """Record the cursors on which `_Cursor.<name>` is called."""
    calls: list[video_mod._Cursor] = []
    original = getattr(video_mod._Cursor, name)

    def spied(self: video_mod._Cursor, *args: object) -> object:
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(video_mod._Cursor, name, spied)
    return calls


@pytest.fixture(params=["held", "sought"])
def packets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Decoding from the packets the demux pass held, or (a file too large to hold them)
    from a second demux of the file, seeking in it."""
    if request.param == "sought":
        monkeypatch.setattr(video_mod, "HOLD_PACKETS_MAX_BYTES", 0)
    return request.param


@pytest.mark.parametrize(("fps", "position"), [(1.0, "start"), (10.0, "start"), (3.0, "center")])
def test_keyframe_seeking_matches_sequential_decoding(
    clips: dict[str, Path],
    fps: float,
    position: str,
    monkeypatch: pytest.MonkeyPatch,
    packets: str,
) -> None:
    seeks = _spy(monkeypatch, "restart")
    demuxes = _spy(monkeypatch, "_demuxed")  # a second pass over the file
    for clip in ("one_key", "key5"):
        seeks.clear()
        got = read_video_frames(clips[clip], fps=fps, position=position)
        frames, times = _all_frames(clips[clip])
        offset = 0.5 if position == "center" else 0.0
        targets = (np.arange(int(3.0 * fps)) + offset) / fps
        if position == "start":
            want = [int(np.argmax(times >= t - 1e-6)) for t in targets]
        else:
            want = [int(np.argmin(np.abs(times - t))) for t in targets]
        np.testing.assert_array_equal(got.frames, frames[want])
        np.testing.assert_allclose(got.times, times[want], atol=1e-6)
        if clip == "one_key":
            assert len(seeks) == 1  # only the rewind after the demux pass
        else:
            assert 1 < len(seeks) <= len(targets)
    assert (len(demuxes) == 0) == (packets == "held")


@pytest.mark.parametrize("name", ["empty", "garbage"])
def test_broken_files_raise_extraction_error(clips: dict[str, Path], name: str) -> None:
    with pytest.raises(ExtractionError):
        read_video_frames(clips[name])
    with pytest.raises(ExtractionError):
        read_audio(clips[name])


def test_missing_streams_raise_extraction_error(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExtractionError, match="no audio stream"):
        read_audio(clips["video_only"])
    with pytest.raises(ExtractionError, match="no video stream"):
        read_video_frames(clips["mono_wav"])
    with pytest.raises(ExtractionError, match="no video frames"):
        read_video_frames(clips["key5"], start=5.0)
    with pytest.raises(ExtractionError, match="missing file"):
        read_video_frames(tmp_path / "absent.mp4")


def test_read_audio_wav_channels_and_resampling(clips: dict[str, Path]) -> None:
    wave, rate = read_audio(clips["mono_wav"])
    assert rate == SR and wave.dtype == np.float32 and wave.shape == (1, SR)
    t = np.arange(SR) / SR
    np.testing.assert_allclose(wave[0], 0.5 * np.sin(2 * np.pi * 440 * t), atol=1e-4)

    both, _ = read_audio(clips["stereo_wav"], mono=False)
    assert both.shape == (2, SR)
    mixed, _ = read_audio(clips["stereo_wav"])
    np.testing.assert_allclose(mixed[0], both.mean(axis=0), atol=1e-7)

    for target in (8000, 22050):
        resampled, rate = read_audio(clips["mono_wav"], sample_rate=target)
        assert rate == target and resampled.shape == (1, target)  # 1 s at the new rate

    part, _ = read_audio(clips["mono_wav"], start=0.25, end=0.5)
    np.testing.assert_array_equal(part, wave[:, 4000:8000])


def test_read_audio_aac_in_mp4(clips: dict[str, Path]) -> None:
    wave, rate = read_audio(clips["key5"])
    assert rate == SR and wave.shape[0] == 1
    assert abs(wave.shape[1] - 3 * SR) <= 2048  # AAC frames of 1024 samples, encoder padding
    assert np.abs(wave).max() <= 1.0
    assert 0.4 < np.abs(wave[0, 4000:44000]).max() < 0.6  # the 0.5 tone survives the codec


def test_kaldi_fbank_matches_the_reference_call() -> None:
    rng = np.random.default_rng(0)
    wave = rng.uniform(-0.5, 0.5, (2, SR)).astype(np.float32) + 0.1  # stereo with DC
    got = kaldi_fbank(wave, SR)
    assert got.shape == (1024, 128) and got.dtype == np.float32

    # the Kinetics-Sounds reference, step for step
    w = torch.from_numpy(wave)
    w = w - w.mean()
    fb = torchaudio.compliance.kaldi.fbank(
        w,
        htk_compat=True,
        sample_frequency=SR,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    fb = torch.nn.ZeroPad2d((0, 0, 0, 1024 - fb.shape[0]))(fb)
    want = ((fb - -4.503877) / (5.141276 * 2)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.allclose(got[200:], 4.503877 / (5.141276 * 2))  # zero rows, normalised

    cropped = kaldi_fbank(wave[0], SR, target_frames=64, num_mel_bins=64)
    assert cropped.shape == (64, 64)


def _librosa_stft_magnitude(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """librosa.stft defaults by hand: zero-pad n_fft//2 each side, periodic Hann, rfft."""
    padded = np.pad(x.astype(np.float64), n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    starts = range(0, padded.size - n_fft + 1, hop)
    return np.abs(np.stack([np.fft.rfft(padded[s : s + n_fft] * window) for s in starts], 1))


def test_stft_log_magnitude_shape_and_values() -> None:
    sr = 22050
    rng = np.random.default_rng(1)
    three = rng.uniform(-1.2, 1.2, 3 * sr).astype(np.float32)
    spec = stft_spectrogram(three, sr)
    assert spec.shape == (257, 188) and spec.dtype == np.float32
    want = _librosa_stft_magnitude(np.clip(three, -1, 1), 512, 353)
    np.testing.assert_allclose(np.exp(spec) - 1e-7, want, atol=2e-3, rtol=1e-4)

    one = three[:sr]
    np.testing.assert_allclose(stft_spectrogram(one, sr), stft_spectrogram(np.tile(one, 3), sr))
    padded = stft_spectrogram(one, sr, tile=False)
    assert padded.shape == (257, 188)
    assert np.all(padded[:, -1] == np.float32(np.log(1e-7)))  # the padded tail is silent


def _moving_square(shift: int) -> np.ndarray:
    rng = np.random.default_rng(2)
    texture = rng.integers(150, 256, (16, 16), dtype=np.uint8)
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    frames[0, 16:32, 20:36] = texture[..., None]
    frames[1, 16:32, 20 + shift : 36 + shift] = texture[..., None]
    return frames


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_optical_flow_of_a_square_moving_right(method: str) -> None:
    flow = optical_flow(_moving_square(2), method=method)
    assert flow.shape == (1, 48, 64, 2) and flow.dtype == np.uint8
    inside = flow[0, 18:30, 24:34]
    assert inside[..., 0].mean() > 128 + 3  # 2 px right -> 255 * 22 / 40 = 140
    assert abs(inside[..., 1].mean() - 128) < 3


def test_optical_flow_quantisation_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    still = optical_flow(np.repeat(_moving_square(0)[:1], 3, axis=0))
    assert still.shape == (2, 48, 64, 2) and np.all(still == 128)  # round(127.5) = 128
    with pytest.raises(ExtractionError, match="at least 2 frames"):
        optical_flow(_moving_square(2)[:1])
    monkeypatch.delattr(cv2, "optflow", raising=False)
    with pytest.raises(UserError, match="opencv-contrib"):
        optical_flow(_moving_square(2), method="tvl1")


def test_flow_pair_frames_interleaves_u_and_v() -> None:
    flow = np.arange(3 * 4 * 5 * 2, dtype=np.uint8).reshape(3, 4, 5, 2)
    planes = flow_pair_frames(flow)
    assert planes.shape == (6, 4, 5, 1)
    for i in range(3):
        np.testing.assert_array_equal(planes[2 * i, ..., 0], flow[i, ..., 0])
        np.testing.assert_array_equal(planes[2 * i + 1, ..., 0], flow[i, ..., 1])
    gray = decode_jpeg(encode_jpeg(planes, quality=95))
    assert gray.shape == (6, 4, 5, 1)


def test_jpeg_round_trip() -> None:
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    frames = np.stack([rgb, rgb[::-1]])
    data = encode_jpeg(frames)
    assert len(data) == 2 and all(d[:2] == b"\xff\xd8" for d in data)
    back = decode_jpeg(data)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 2
    gray = decode_jpeg(encode_jpeg(frames[..., :1]))
    assert gray.shape == (2, 48, 64, 1)
    assert np.abs(gray.astype(int) - frames[..., :1]).mean() < 2


def test_segment_indices_follow_the_reference_formula() -> None:
    n, k = 10, 3
    seg = n // k
    one_based = [i * seg + max(seg // 2, 1) for i in range(k)]  # 1, 4, 7
    assert segment_indices(n, k, train=False, rng=None).tolist() == [t - 1 for t in one_based]
    assert segment_indices(20, 3, train=False, rng=None).tolist() == [2, 8, 14]  # seg 6: 3, 9, 15

    draws = np.stack(
        [segment_indices(n, k, train=True, rng=np.random.default_rng(s)) for s in range(200)]
    )
    for i in range(k):  # randint(i*seg + 1, i*seg + seg), 1-indexed and inclusive
        assert set(draws[:, i].tolist()) == {i * seg, i * seg + 1, i * seg + 2}
    a = segment_indices(n, k, train=True, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(
        a, segment_indices(n, k, train=True, rng=np.random.default_rng(7))
    )
    with pytest.raises(ValueError, match="rng"):
        segment_indices(n, k, train=True, rng=None)


def test_segment_indices_fallback_when_fewer_frames_than_segments() -> None:
    assert segment_indices(2, 3, train=False, rng=None).tolist() == [0, 0, 1]
    assert segment_indices(1, 3, train=True, rng=np.random.default_rng(0)).tolist() == [0, 0, 0]
    assert segment_indices(3, 3, train=False, rng=None).tolist() == [0, 1, 2]


@pytest.mark.parametrize(("fps", "position"), [(1.0, "start"), (3.0, "center")])
def test_frames_nobody_needs_are_skipped(
    clips: dict[str, Path],
    fps: float,
    position: str,
    monkeypatch: pytest.MonkeyPatch,
    packets: str,
) -> None:
    # x264's B-frames that no frame refers to are dropped undecoded; the kept ones are exact
    checks = _spy(monkeypatch, "skipping_was_safe")
    got = read_video_frames(clips["one_key"], fps=fps, position=position)
    decoded = sum(len(run) for run in checks[0]._skipping.runs)
    last = round(float(got.times[-1]) * RATE)
    assert decoded < last + 1  # a full decode gives every frame up to the last kept one
    frames, _ = _all_frames(clips["one_key"])
    np.testing.assert_array_equal(got.frames, frames[np.round(got.times * RATE).astype(int)])


def test_frames_without_their_packets_timestamps_are_decoded_in_full(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch, packets: str
) -> None:
    # frames whose pts are not their packets' (as the demux pass saw them): skipping by packet
    # could drop a kept frame, so the clip is decoded again without skipping
    index_stream = video_mod._Cursor._index_stream

    def shifted(
        self: video_mod._Cursor, also: video_mod.PacketSink | None
    ) -> video_mod._StreamIndex:
        index = index_stream(self, also)
        index.frame_pts = [p + 1 for p in index.frame_pts]
        return index

    monkeypatch.setattr(video_mod._Cursor, "_index_stream", shifted)
    rewinds = _spy(monkeypatch, "rewind")
    got = read_video_frames(clips["one_key"], position="center")
    assert len(rewinds) == 1
    assert _frame_ids(got.frames) == [5, 15, 25]


def test_resampling_is_torchaudios(clips: dict[str, Path]) -> None:
    wave, rate = read_audio(clips["stereo_wav"], mono=False)
    for target in (8000, 22050):
        got, _ = read_audio(clips["stereo_wav"], mono=False, sample_rate=target)
        want = torchaudio.functional.resample(torch.from_numpy(wave), rate, target).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("start", "end"), [(0.0, None), (0.5, 2.0)])
def test_sound_read_with_the_frames_is_read_audios(
    clips: dict[str, Path], start: float, end: float | None
) -> None:
    # the sound decoded in the pass that indexes the video: the same frames and the same wave
    # as two separate reads of the file
    for name in ("one_key", "key5"):
        sound = AudioDecoder(start=start, end=end)
        together = read_video_frames(clips[name], fps=2, size=(32, 48), also=sound)
        alone = read_video_frames(clips[name], fps=2, size=(32, 48))
        np.testing.assert_array_equal(together.frames, alone.frames)
        np.testing.assert_array_equal(together.times, alone.times)
        for rate in (None, 8000):
            got = sound.wave(sample_rate=rate, mono=True)
            want = read_audio(clips[name], sample_rate=rate, start=start, end=end)
            assert got[1] == want[1]
            np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(ExtractionError, match="no audio stream"):
        read_video_frames(clips["video_only"], also=AudioDecoder())


def test_a_clip_extracted_in_one_pass_is_the_same(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # frames then sound from one file: one opening of it, the record of two separate reads
    params = AVParams(
        modalities=[
            FramesParams(fps=1, max_frames=3, size=[32, 32]),
            FbankParams(target_frames=64, num_mel_bins=32),
        ]
    )
    task = ClipTask("k", 0, "k.mp4", {"video": str(clips["key5"]), "audio": str(clips["key5"])})
    opened: list[str] = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda path, *a, **k: opened.append(path) or real_open(path))
    record = extract_clip(params, task)
    assert opened == [str(clips["key5"])]
    monkeypatch.setattr(av_clips, "_sound_with_frames", lambda params, task: None)
    separate = extract_clip(params, task)
    assert len(opened) == 3
    assert record.values["visual"] == separate.values["visual"]
    np.testing.assert_array_equal(record.times["visual"], separate.times["visual"])
    np.testing.assert_array_equal(record.values["audio"], separate.values["audio"])
    silent = {"video": str(clips["video_only"]), "audio": str(clips["video_only"])}
    with pytest.raises(ExtractionError, match="no audio stream"):
        extract_clip(params, ClipTask("s", 0, "s.mp4", silent))
