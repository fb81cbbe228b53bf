"""BraTS 2018 brain-tumour segmentation with four MRI sequences, read from the NIfTI files of the
training release, preprocessed as mmFormer's official code does.

Raw layout: `MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii`
or `.nii.gz` (`--raw` names that folder or the folder holding it). One sample per case.

Preprocessing (`intensity: mmformer`, the default) as mmFormer's `mmformer/preprocess.py`
(YaoZhang93/mmFormer @ b18663adbfd0323656083e0470420c8c715c1782): the sequences stacked in the
order flair, t1ce, t1, t2 as float32 (line 72); cropped to the box of the non-zero voxels of
their maximum, each side widened to at least 128 voxels as `sup_128` does, upper bound the last
non-zero index used as a slice end (15-42); each sequence z-scored over the brain mask (sum over
the sequences > 0) of the crop (44-52); the segmentation cropped alike, uint8, label 4 -> 3
(78-81). Arrays keep the NIfTI voxel order (mmFormer's H, W, Z). Then [ours]: every case is
center-cropped or padded to the fixed `shape` (shards store fixed shapes); the padding holds the
value a zero voxel takes under the case's z-score, so it reads as background, and a case whose
tumour the fixed shape would cut is an extraction error.

`intensity: lckd` instead applies `truncate` of LCKD's `BraTSDataSet.py` (billhhh/LCKD @
5ba51b5366a74d01906cc8389855bb8e3e1ae42a, lines 247-255) to each full volume: cap at the
highest histogram bin index holding >= 50 voxels, z-score over the voxels that differ from the
corner value, those set to 0; the crop and the fixed shape stay as above (padding 0).

Splits. `mmformer`: mmFormer's `mmformer/data/datasets_nii.py` (42-56, 116-129) sorts the
preprocessed cases by `<HGG|LGG>_<case>`, shuffles their positions after `np.random.seed(0)`
and cuts them with `np.split(idx, 3)`: fold 0 is the test set, folds 1-2 the training set.
mmFormer has no validation set; `val` is a seeded share of its training folds, stratified by
grade [ours]. The cut is over every case folder found (a corrupt case keeps its fold and is
missing from it), and `np.array_split` [ours] allows counts not divisible by 3 (identical for
BraTS 2018's 285). `lckd`: LCKD's lists (`datalist/BraTS18/BraTS18_{train,val}.csv`, 228 / 57
case folders, no header), given as files; each line's last two path parts name the case.

Labels. `classes` are the voxel classes of `target` (background, NCR/NET, edema, enhancing); the
per-sample `label` is the grade (HGG 0, LGG 1, used to stratify `val` and by class-balanced
sampling): an index below the four classes, but not a voxel class.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import ClassVar, Literal

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmval.data.extract import ExtractionError
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import TARGET, ModalitySpec, SampleRecord
from mmval.data.sources.base import stratified_fractions
from mmval.errors import UserError

SEQUENCES = ("flair", "t1ce", "t1", "t2")  # mmFormer's stacking order (preprocess.py 72)
GRADES = ("HGG", "LGG")  # label 0, 1
RELEASE = "MICCAI_BraTS_2018_Data_Training"
SEG_LABELS = (0, 1, 2, 4)  # BraTS: background, NCR/NET, edema, enhancing tumour


class BratsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: tuple[int, int, int] = Field(
        default=(160, 192, 160),
        description="stored volume size in NIfTI voxel order, cases center-cropped or padded "
        "to it [ours]",
    )
    min_extent: int = Field(
        default=128,
        ge=1,
        description="each side of the crop box widened to at least this "
        "(mmFormer's sup_128: its training patch size)",
    )
    intensity: Literal["mmformer", "lckd"] = Field(
        default="mmformer",
        description="mmformer: z-score over the brain mask of the crop (preprocess.py); lckd: "
        "LCKD's truncate per full volume (BraTSDataSet.py)",
    )
    splits: Literal["mmformer", "lckd"] = Field(
        default="mmformer",
        description="mmformer: seed-0 shuffle in 3 folds, fold 0 test; lckd: LCKD's list files",
    )
    val_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="share of mmFormer's training folds kept for "
        "validation, stratified by grade [ours]; 0: no val split",
    )
    val_seed: int = Field(default=0, description="seed of the validation carve [ours]")
    lists: dict[str, str] = Field(
        default_factory=dict,
        description="splits: lckd: split -> LCKD list file (absolute, or relative to the raw "
        "folder), e.g. {train: BraTS18_train.csv, val: BraTS18_val.csv}",
    )
    rows_per_shard: int = Field(
        default=4, ge=1, description="cases per shard (a case is ~44 MB at the default shape)"
    )


# ---------------------------------------------------------------------------- preprocessing
def widen(lo: int, hi: int, min_extent: int) -> tuple[int, int]:
    """mmFormer's `sup_128` (preprocess.py 15-24) with 128 as `min_extent`."""
    if hi - lo < min_extent:
        half = int((min_extent - (hi - lo)) / 2)
        hi = hi + half + 1
        lo = lo - half
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, hi


def crop_box(volumes: np.ndarray, min_extent: int) -> tuple[slice, slice, slice]:
    """mmFormer's `crop` (preprocess.py 26-42): the non-zero box of the maximum over the
    sequences [S, X, Y, Z], each side widened; the last non-zero index is the slice end."""
    nonzero = np.nonzero(np.amax(volumes, axis=0) != 0)
    if not nonzero[0].size:
        raise ExtractionError("every sequence is zero everywhere")
    x, y, z = (slice(*widen(int(n.min()), int(n.max()), min_extent)) for n in nonzero)
    return x, y, z


def fit(array: np.ndarray, shape: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """Center-crop or pad the last len(shape) axes to `shape` (extra voxel after) [ours]."""
    lead = array.ndim - len(shape)
    cut = [slice(None)] * lead
    pad = [(0, 0)] * lead
    for size, want in zip(array.shape[lead:], shape, strict=True):
        start = max(size - want, 0) // 2
        cut.append(slice(start, start + want))
        before = max(want - size, 0) // 2
        pad.append((before, max(want - size, 0) - before))
    return np.pad(array[tuple(cut)], pad, constant_values=fill)


def mmformer_zscore(volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence mean and std over the brain mask `volumes.sum(0) > 0` (preprocess.py
    44-52; numpy's std, ddof 0)."""
    mask = volumes.sum(0) > 0
    if not mask.any():
        raise ExtractionError("empty brain mask (no voxel with a positive sum over sequences)")
    inside = volumes[:, mask]
    mean, std = inside.mean(axis=1), inside.std(axis=1)
    flat = [SEQUENCES[k] for k in np.flatnonzero(std == 0)]
    if flat:
        raise ExtractionError(f"{', '.join(flat)}: constant inside the brain mask")
    return mean, std


def lckd_truncate(mri: np.ndarray) -> np.ndarray:
    """LCKD's `truncate` (BraTSDataSet.py 247-255) of one volume as read from its file."""
    top = int(mri.max())
    if top < 1:
        raise ExtractionError("maximum below 1: LCKD's histogram has no bin")
    hist, _ = np.histogram(mri, bins=top)
    full = np.flatnonzero(hist >= 50)
    if not full.size:
        raise ExtractionError("no histogram bin holds 50 voxels (LCKD's truncate)")
    cap = np.float32(full[-1])  # the bin's index, as LCKD uses it
    mri = np.where(mri >= cap, cap, mri).astype(mri.dtype)
    corner = mri[0, 0, 0]
    mri = np.where(mri != corner, mri - np.mean(mri[mri != corner]), 0 * mri)
    return np.where(mri != corner, mri / np.std(mri[mri != corner] + 1e-7), 0 * mri)


def read_volume(path: Path) -> np.ndarray:
    """The voxel array as stored (scaled if the header says so), 3-D."""
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise ExtractionError(f"{path.name}: unreadable NIfTI ({exc})") from None
    if data.ndim != 3:
        raise ExtractionError(f"{path.name}: {data.ndim}-D, expected a 3-D volume")
    return data


def extract_case(params: BratsParams, task: ClipTask) -> SampleRecord:
    """One case: four preprocessed float16 [1, *shape] sequences and the uint8 target."""
    raw = {name: read_volume(Path(task.files[name])) for name in (*SEQUENCES, "seg")}
    shapes = {name: v.shape for name, v in raw.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise ExtractionError(f"the volumes' shapes disagree: {listed}")
    seg = raw.pop("seg")
    if not np.isin(seg, SEG_LABELS).all():
        found = sorted(set(np.unique(seg).tolist()) - set(SEG_LABELS))[:5]
        raise ExtractionError(f"seg holds values {found} outside {list(SEG_LABELS)}")
    volumes = np.stack([raw[n] for n in SEQUENCES]).astype(np.float32)
    box = crop_box(volumes, params.min_extent)
    seg = seg.astype(np.uint8)[box]
    seg[seg == 4] = 3
    target = fit(seg, params.shape)
    lost = int(np.count_nonzero(seg)) - int(np.count_nonzero(target))
    if lost:
        raise ExtractionError(
            f"the fixed shape {list(params.shape)} cuts {lost} tumour voxels of the "
            f"{list(seg.shape)} crop; raise `shape`"
        )
    if params.intensity == "mmformer":
        cropped = volumes[(slice(None), *box)]
        mean, std = mmformer_zscore(cropped)
        scaled = (fit(cropped, params.shape) - mean[:, None, None, None]) / std[:, None, None, None]
    else:
        truncated = np.stack([lckd_truncate(raw[n]) for n in SEQUENCES]).astype(np.float32)
        scaled = fit(truncated[(slice(None), *box)], params.shape)
    values: dict[str, np.ndarray | list[bytes]] = {
        name: scaled[k][None].astype(np.float16) for k, name in enumerate(SEQUENCES)
    }
    values[TARGET] = target
    return SampleRecord(task.sample_id, task.label, task.source, values)


# ---------------------------------------------------------------------------- planning
def _release_root(raw: Path) -> Path:
    if not any((raw / g).is_dir() for g in GRADES) and (raw / RELEASE).is_dir():
        return raw / RELEASE
    return raw


def _case_files(root: Path, case: str) -> dict[str, str] | str:
    """Each file of a case (.nii.gz, else .nii), or why one is missing."""
    name = case.split("/")[-1]
    files: dict[str, str] = {}
    for kind in (*SEQUENCES, "seg"):
        found = [root / case / f"{name}_{kind}{ext}" for ext in (".nii.gz", ".nii")]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            return f"missing {name}_{kind}.nii.gz (or .nii)"
        files[kind] = str(path)
    return files


def mmformer_folds(cases: list[str]) -> list[list[str]]:
    """mmFormer's three folds of the cases `<grade>/<case>` (datasets_nii.py 42-56): sorted by
    `<grade>_<case>`, positions shuffled by numpy's global generator seeded 0, cut in three."""
    ordered = sorted(cases, key=lambda c: c.replace("/", "_", 1))
    positions = np.arange(len(ordered))
    np.random.RandomState(0).shuffle(positions)  # what np.random.seed(0); shuffle does
    return [[ordered[i] for i in fold] for fold in np.array_split(positions, 3)]


def _read_lckd_list(path: Path, known: set[str]) -> list[str]:
    if not path.is_file():
        raise UserError(f"the LCKD list {path} does not exist (params `lists`).")
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line == "BraTS_2020_subject_ID":  # LCKD skips that header
            continue
        parts = line.rstrip("/").split("/")
        case = "/".join(parts[-2:])
        if parts[-2:-1] and parts[-2] not in GRADES:
            raise UserError(f"{path} line {number}: {line!r} is not a .../HGG|LGG/<case> folder.")
        if case not in known:
            raise UserError(f"{path} line {number}: no case folder {case} under the raw folder.")
        cases.append(case)
    return cases


class BratsNiftiSource:
    Params: ClassVar[type[BaseModel]] = BratsParams
    name: ClassVar[str] = "brats_nifti"
    needs_raw: ClassVar[bool] = True

    def plan(
        self,
        manifest: DatasetManifest,
        params: BratsParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        """One task per case folder; a case missing a file is a planning error."""
        if len(manifest.classes) != 4:
            raise UserError(
                f"{manifest.name}: brats_nifti's classes are the four voxel classes "
                f"(background, NCR/NET, edema, enhancing), got {manifest.classes}."
            )
        root = _release_root(Path(raw))
        cases = sorted(
            f"{grade}/{d.name}"
            for grade in GRADES
            if (root / grade).is_dir()
            for d in (root / grade).iterdir()
            if d.is_dir()
        )
        if not cases:
            raise UserError(
                f"{raw} has no case folder under HGG/ or LGG/ (expected "
                f"{RELEASE}/HGG/<case>/<case>_flair.nii.gz etc.)."
            )
        listed = self._splits(params, Path(raw), cases)
        if only_splits is not None:
            unknown = sorted(set(only_splits) - set(listed))
            if unknown:
                raise UserError(
                    f"--splits: {manifest.name} has no split(s) {unknown}; it has {sorted(listed)}."
                )
            listed = {s: c for s, c in listed.items() if s in only_splits}
        splits: dict[str, list[ClipTask]] = {}
        errors: list[tuple[str, str]] = []
        for split, members in listed.items():
            splits[split] = []
            for case in sorted(members)[:limit]:
                files = _case_files(root, case)
                if isinstance(files, str):
                    errors.append((case, files))
                else:
                    label = GRADES.index(case.split("/")[0])
                    splits[split].append(ClipTask(case, label, case, files))
        if not any(splits.values()):
            raise UserError(f"no case under {root} has all of its five NIfTI files.")
        described = {
            "flair": "FLAIR",
            "t1ce": "T1 with contrast (T1Gd)",
            "t1": "native T1",
            "t2": "T2",
        }
        return PrepPlan(
            classes=list(manifest.classes),
            modalities=[
                ModalitySpec(
                    name=name,
                    dtype="float16",
                    shape=[1, *params.shape],
                    description=f"{described[name]} volume, z-scored ({params.intensity})",
                )
                for name in SEQUENCES
            ],
            extraction={"label": {"HGG": 0, "LGG": 1}},
            splits=splits,
            extractor=functools.partial(extract_case, params),
            rows_per_shard=params.rows_per_shard,
            errors=errors,
            task="segmentation",
            target=ModalitySpec(
                name=TARGET,
                dtype="uint8",
                shape=list(params.shape),
                description="voxel class: 0 background, 1 NCR/NET, 2 edema, 3 enhancing (seg 4)",
            ),
        )

    @staticmethod
    def _splits(params: BratsParams, raw: Path, cases: list[str]) -> dict[str, list[str]]:
        if params.splits == "lckd":
            if not params.lists:
                raise UserError(
                    "splits: lckd reads LCKD's list files: set params `lists`, e.g. "
                    "lists={train: BraTS18_train.csv, val: BraTS18_val.csv}."
                )
            return {
                split: _read_lckd_list(raw / path, set(cases))
                for split, path in params.lists.items()
            }
        test, *train_folds = mmformer_folds(cases)
        train = [c for fold in train_folds for c in fold]
        if params.val_fraction == 0:
            return {"train": train, "test": test}
        grades = [GRADES.index(c.split("/")[0]) for c in train]
        parts = stratified_fractions(
            train,
            grades,
            {"train": 1 - params.val_fraction, "val": params.val_fraction},
            params.val_seed,
        )
        return {"train": parts["train"], "val": parts["val"], "test": test}
