"""mmval prep vs a reference pipeline written the way the official repositories do it.

Reference (OGM-GE style): per clip, the ffmpeg command line dumps 1-fps JPEG frames into a
folder and the audio into a 16 kHz wav; a second Python pass computes the Kaldi fbank of each
wav and saves it as .npy. mmval: `mmval prep kinetics-sounds` (PyAV in-process, only the kept
frames converted, one pass, Parquet shards). Both use the same number of processes on the same
synthetic 10-s 640x360 25-fps H.264 + AAC clips (one keyframe per clip, like Kinetics cuts).

Train clips are hard-linked under new ids (`--copies`) so that the job is long enough for the
worker start-up to matter less; the wall time includes it. Both pipelines fork their worker
pools (on Linux), so neither pays for re-importing torch in its workers.
Run: python bench/prep.py [--clips N] [--copies C] [--workers W]. Needs the ffmpeg program.
Prints one JSON object on its last line and writes it to bench/results/prep.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio
from _results import machine, publish

from mmval.data.prep import prepare
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw


def reference_clip(job: tuple[str, str]) -> None:
    clip, out = job
    frames = Path(out) / "frames" / Path(clip).stem
    frames.mkdir(parents=True, exist_ok=True)
    quiet = ["-hide_banner", "-loglevel", "error", "-y", "-i", clip]
    subprocess.run(
        ["ffmpeg", *quiet, "-vf", "fps=1", "-q:v", "2", str(frames / "frame_%05d.jpg")], check=True
    )
    wav = Path(out) / "wav" / f"{Path(clip).stem}.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", *quiet, "-vn", "-ac", "1", "-ar", "16000", str(wav)], check=True)


def reference_fbank(job: tuple[str, str]) -> None:
    wav, out = job
    torch.set_num_threads(1)
    with wave.open(wav, "rb") as reader:  # torchaudio.load needs torchcodec in 2.9
        sr = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    waveform = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
    waveform = waveform - waveform.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=sr,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, 1024 - fbank.shape[0])))[:1024]
    np.save(Path(out) / f"{Path(wav).stem}.npy", ((fbank + 4.503877) / (5.141276 * 2)).numpy())


def replicate(raw: Path, copies: int) -> list[Path]:
    """Hard-link every train clip `copies` times under new YouTube ids (listed in my_train.txt),
    so that a few generated clips make a job long enough for worker start-up not to dominate."""
    lines = (raw / "my_train.txt").read_text().splitlines()
    added = []
    for line in lines:
        stem, frames, label = line.split(",")
        source = raw / "train" / f"{stem}.mp4"
        for k in range(1, copies):
            new_stem = f"{k:02d}{stem[2:]}"
            (raw / "train" / f"{new_stem}.mp4").hardlink_to(source)
            added.append(f"{new_stem},{frames},{label}")
    (raw / "my_train.txt").unlink()  # a hard link: write a new file, not through the link
    (raw / "my_train.txt").write_text("\n".join(lines + added) + "\n")
    return sorted((raw / "train").glob("*.mp4")) + sorted((raw / "val").glob("*.mp4"))


def run_reference(clips: list[Path], out: Path, workers: int) -> float:
    started = time.perf_counter()
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers) as pool:
        pool.map(reference_clip, [(str(c), str(out)) for c in clips])
        (out / "spec").mkdir()
        wavs = sorted((out / "wav").glob("*.wav"))
        pool.map(reference_fbank, [(str(w), str(out / "spec")) for w in wavs])
    return time.perf_counter() - started


def run_mmval(raw: Path, out: Path, workers: int) -> float:
    started = time.perf_counter()
    result = prepare("kinetics-sounds", out, raw=raw, workers=workers)
    assert result.summary is not None and result.summary.failure_share == 0
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16, help="distinct clips generated")
    parser.add_argument("--copies", type=int, default=6, help="times each train clip is listed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("the reference pipeline needs the ffmpeg program on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = SyntheticAVParams(
            layout="kinetics-sounds",
            classes=["0", "1"],
            clips_per_class=max(1, args.clips // 4),
            seconds=10.0,
            fps=25,
            size=(360, 640),
            sample_rate=44100,
        )
        write_synthetic_raw(root / "raw", params)
        clips = replicate(root / "raw", args.copies)
        for clip in clips:  # warm the page cache for both contenders alike
            clip.read_bytes()
        reference_s = run_reference(clips, root / "reference", args.workers)
        mmval_s = run_mmval(root / "raw", root / "mmval", args.workers)
    n = len(clips)
    result = {
        "bench": "prep",
        "clips": n,
        "distinct_clips": args.clips,
        "workers": args.workers,
        "clip": "10 s, 640x360, 25 fps H.264 (1 keyframe) + AAC 44.1 kHz mono",
        "mmval_clips_per_s": round(n / mmval_s, 2),
        "reference_clips_per_s": round(n / reference_s, 2),
        "speedup_vs_reference": round(reference_s / mmval_s, 2),
        "machine": machine(with_torch=False),
        "ffmpeg": subprocess.run(
            ["ffmpeg", "-version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
    }
    publish("prep", result)


if __name__ == "__main__":
    main()
