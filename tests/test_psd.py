"""PMR-style log PSD against values computed once with scipy.signal.spectrogram."""

from __future__ import annotations

import numpy as np
import torch

from mmval.data.extract.psd import log_psd, tukey

# scipy 1.x: x = clip(tile(w, 4)[:10000]); spectrogram(x, 8000, nperseg=64, noverlap=32);
# log(S + 1e-7), z-normalised; rows 0, 3, 4, 5, 20, 32 and columns 0, 1, 100
SCIPY = np.array(
    [
        [1.021982, -0.385154, 1.056491],
        [2.58287, 2.613282, 2.583674],
        [2.644007, 2.618785, 2.641213],
        [1.617729, 1.555153, 1.595259],
        [-0.701726, -0.694277, -0.703516],
        [-0.707255, -0.707261, -0.707275],
    ]
)


def test_matches_scipy_spectrogram():
    t = np.arange(3000) / 8000.0
    wave = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.cos(2 * np.pi * 1234 * t)
    spec = log_psd(wave, 8000, nperseg=64, noverlap=32, samples=10000)
    assert spec.shape == (33, 311) and spec.dtype == np.float32
    assert np.allclose(spec[[0, 3, 4, 5, 20, 32]][:, [0, 1, 100]], SCIPY, atol=1e-4)
    assert abs(spec.mean()) < 1e-5 and abs(spec.std() - 1) < 1e-4


def test_reference_shape_and_window():
    spec = log_psd(np.random.default_rng(0).uniform(-1, 1, 22050), 22050)
    assert spec.shape == (257, 1004)  # PMR's assert for AVE
    assert torch.allclose(tukey(8), torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64))
