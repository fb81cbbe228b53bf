"""Log power spectral density in the form PMR's AVE audio uses (scipy.signal.spectrogram)."""

from __future__ import annotations

import math

import numpy as np
import torch


def tukey(n: int, alpha: float = 0.25) -> torch.Tensor:
    """scipy.signal.get_window(('tukey', alpha), n): the periodic Tukey window (length n + 1,
    symmetric, last sample dropped)."""
    m = n + 1
    x = torch.arange(m, dtype=torch.float64)
    width = math.floor(alpha * (m - 1) / 2.0)
    w = torch.ones(m, dtype=torch.float64)
    rise = x[: width + 1]
    w[: width + 1] = 0.5 * (1 + torch.cos(math.pi * (-1 + 2.0 * rise / alpha / (m - 1))))
    fall = x[m - width - 1 :]
    w[m - width - 1 :] = 0.5 * (
        1 + torch.cos(math.pi * (-2.0 / alpha + 1 + 2.0 * fall / alpha / (m - 1)))
    )
    return w[:n]


def log_psd(
    wave: np.ndarray,
    sample_rate: int,
    *,
    nperseg: int = 512,
    noverlap: int = 353,
    samples: int = 160000,
) -> np.ndarray:
    """PMR's audio_extract: tile the mono wave to `samples`, clip to [-1, 1], one-sided PSD
    (Tukey 0.25 window, constant detrend per segment, density scaling) as scipy computes it,
    log(S + 1e-7), then z-normalise over the whole spectrogram. Returns [nperseg/2+1, frames]."""
    x = torch.from_numpy(np.asarray(wave, np.float64).reshape(-1, np.shape(wave)[-1])[0].copy())
    if x.numel() == 0:
        raise ValueError("empty waveform")
    x = x.repeat(math.ceil(samples / x.numel()))[:samples].clamp(-1.0, 1.0)
    segments = x.unfold(0, nperseg, nperseg - noverlap)
    segments = segments - segments.mean(dim=1, keepdim=True)
    window = tukey(nperseg)
    power = torch.fft.rfft(segments * window, dim=1).abs() ** 2 / (
        sample_rate * window.pow(2).sum()
    )
    power[:, 1 : -1 if nperseg % 2 == 0 else None] *= 2
    spec = torch.log(power.T + 1e-7)
    spec = (spec - spec.mean()) / (spec.std(unbiased=False) + 1e-9)
    return spec.float().numpy()
