"""A small fake BraTS 2018 training release: MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<case>/
<case>_{flair,t1,t1ce,t2,seg}.nii.gz, 16^3 int16 volumes.

Each case is an ellipsoidal "brain" of noisy tissue on a zero background with a spherical tumour:
edema (2) around a core whose outer shell is enhancing (4) and whose inside is necrotic (1); LGG
cases have no enhancing shell (their core is all necrotic), as LGG often lack one. Each sequence
shows other regions, so subsets of sequences differ in what they can segment: FLAIR the whole
tumour bright, T1ce the enhancing shell bright, T2 the edema bright, T1 the core dark. Contrasts
are several noise widths: a small 3-D network learns the whole tumour from FLAIR in a few epochs.
The writer returns what a correct prep must produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

SIZE = 16
RELEASE = "MICCAI_BraTS_2018_Data_Training"
SEQUENCES = ("flair", "t1ce", "t1", "t2")


@dataclass
class FakeBrats:
    root: Path  # the release folder (HGG/, LGG/)
    cases: list[str] = field(default_factory=list)  # every case folder "<grade>/<case>"
    failures: dict[str, str] = field(default_factory=dict)  # case -> part of the reason


def case_volumes(rng: np.random.Generator, grade: str) -> dict[str, np.ndarray]:
    """The four sequences (int16) and the seg (uint8, labels 0 1 2 4) of one case."""
    axes = np.indices((SIZE,) * 3).astype(float)
    centre = np.array([7.5, 7.5, 7.5])
    radii = np.array([6.5, 7.2, 6.0])
    brain = (((axes - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    where = centre + rng.uniform(-1.5, 1.5, 3)
    dist = np.sqrt(((axes - where[:, None, None, None]) ** 2).sum(0))
    outer = rng.uniform(4.0, 5.0)
    core_r = outer - rng.uniform(1.5, 2.0)
    seg = np.zeros((SIZE,) * 3, np.uint8)
    seg[(dist <= outer) & brain] = 2
    seg[(dist <= core_r) & brain] = 1
    if grade == "HGG":
        seg[(dist <= core_r) & (dist > core_r - 1.2) & brain] = 4
    tissue = {"flair": 300.0, "t1ce": 350.0, "t1": 450.0, "t2": 250.0}
    bright = {
        "flair": np.isin(seg, (1, 2, 4)) * 400.0,
        "t1ce": (seg == 4) * 500.0,
        "t1": np.isin(seg, (1, 4)) * -250.0,
        "t2": (seg == 2) * 400.0,
    }
    out: dict[str, np.ndarray] = {}
    for name in SEQUENCES:
        value = tissue[name] + bright[name] + rng.normal(0, 40, seg.shape)
        out[name] = np.where(brain, np.clip(value, 1, None), 0).round().astype(np.int16)
    out["seg"] = seg
    return out


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def write_brats(raw: Path, hgg: int = 8, lgg: int = 4, corrupt: bool = True) -> FakeBrats:
    """`hgg` + `lgg` good cases under raw/MICCAI_BraTS_2018_Data_Training; with `corrupt`, three
    more HGG cases: one without its T2 file, one with an unreadable FLAIR file, one whose T1 has
    another shape than its other volumes."""
    rng = np.random.default_rng(0)
    fake = FakeBrats(raw / RELEASE)
    names = [("HGG", f"Brats18_FAKE_{i}_1") for i in range(hgg)]
    names += [("LGG", f"Brats18_FAKE_{100 + i}_1") for i in range(lgg)]
    if corrupt:
        names += [("HGG", f"Brats18_BAD_{i}_1") for i in range(3)]
    for grade, case in names:
        volumes = case_volumes(rng, grade)
        for kind, array in volumes.items():
            _save(fake.root / grade / case / f"{case}_{kind}.nii.gz", array)
        fake.cases.append(f"{grade}/{case}")
    if corrupt:
        bad = fake.root / "HGG"
        (bad / "Brats18_BAD_0_1" / "Brats18_BAD_0_1_t2.nii.gz").unlink()
        fake.failures["HGG/Brats18_BAD_0_1"] = "missing Brats18_BAD_0_1_t2"
        (bad / "Brats18_BAD_1_1" / "Brats18_BAD_1_1_flair.nii.gz").write_bytes(b"not a nifti")
        fake.failures["HGG/Brats18_BAD_1_1"] = "unreadable NIfTI"
        t1 = bad / "Brats18_BAD_2_1" / "Brats18_BAD_2_1_t1.nii.gz"
        _save(t1, np.ones((SIZE, SIZE, SIZE - 1), np.int16))
        fake.failures["HGG/Brats18_BAD_2_1"] = "shapes disagree"
    return fake
