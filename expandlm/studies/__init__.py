"""Studies: many runs of the pipeline compared in one report (`expandlm compare CONFIG`)."""
from __future__ import annotations

from pathlib import Path

from ..config import load_yaml
from .combine import CombineStudy, load_combine_config
from .compare import Study, load_config


def load_study(path: str | Path):
    """The study a config describes, as (config, the study class that runs it): the two-domain (or growth)
    study, or, with `experts`, the combination study."""
    data = load_yaml(path)
    if isinstance(data, dict) and "experts" in data:
        return load_combine_config(data, path), CombineStudy
    return load_config(path), Study
