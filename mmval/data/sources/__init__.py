"""Source adapters: one per kind of raw data, each turning raw input into split samples."""

from __future__ import annotations

from mmval.data.sources.av_clips import AVClipsSource
from mmval.data.sources.ave_features import AveFeaturesSource
from mmval.data.sources.base import BuiltData, Source
from mmval.data.sources.brats_nifti import BratsNiftiSource
from mmval.data.sources.folder import FolderSource
from mmval.data.sources.image_text import ImageTextSource
from mmval.data.sources.mmlsyndata import MMLSynDataSource
from mmval.data.sources.mult_pickle import MultPickleSource
from mmval.data.sources.multiview_mat import MultiviewMatSource
from mmval.data.sources.nvgesture import NvGestureSource
from mmval.data.sources.rgbd_scenes import RgbdScenesSource
from mmval.data.sources.synthetic import SyntheticSource
from mmval.data.sources.table import TableSource
from mmval.data.sources.uci_mfeat import UciMfeatSource

SOURCES: dict[str, Source] = {
    src.name: src
    for src in (
        UciMfeatSource(),
        SyntheticSource(),
        AVClipsSource(),
        ImageTextSource(),
        FolderSource(),
        MultPickleSource(),
        MMLSynDataSource(),
        TableSource(),
        MultiviewMatSource(),
        RgbdScenesSource(),
        NvGestureSource(),
        BratsNiftiSource(),
        AveFeaturesSource(),
    )
}

__all__ = ["SOURCES", "BuiltData", "Source"]
