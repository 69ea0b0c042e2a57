"""Studies: many runs of the pipeline compared in one report (`expandlm compare CONFIG`).

A study config names its type with `study:`: `expansion` (compare.py: the two-domain study, or with
`grow` the growth study) or `combine` (combine.py: merging, routing and distilling experts).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import load_yaml
from ..errors import UserError
from ..process import log
from .combine import CombineStudy, CombineStudyConfig, load_combine_config
from .compare import Study, StudyConfig, load_config

# study type → (its config, the loader of that config, the study that runs it)
STUDIES = {"expansion": (StudyConfig, load_config, Study),
           "combine": (CombineStudyConfig, load_combine_config, CombineStudy)}


def load_study(path: str | Path):
    """The study a config describes, as (config, the study class that runs it)."""
    data = load_yaml(path)
    _, load, study = STUDIES[study_type(data, path)]
    return load({k: v for k, v in data.items() if k != "study"}, path), study


def _keys_of_one_type(data: dict) -> dict[str, list[str]]:
    """For each study type, the keys of `data` that only that type's config has."""
    keys = {kind: {f.name for f in dataclasses.fields(cfg)} for kind, (cfg, _, _) in STUDIES.items()}
    return {kind: [k for k in data if k in own and not any(k in keys[o] for o in keys if o != kind)]
            for kind, own in keys.items()}


def study_type(data: dict, path) -> str:
    """The type a config declares with `study:`, checked against its keys. A config written before that key
    (without it) is read as the one type whose keys it uses, said in one log line."""
    distinct = _keys_of_one_type(data)
    declared = data.get("study")
    if declared is not None:
        if not isinstance(declared, str) or declared not in STUDIES:
            raise UserError(f"{path}: 'study': unknown study type {declared!r} (known: {', '.join(STUDIES)})")
        for other, keys in distinct.items():
            if other != declared and keys:
                raise UserError(f"{path}: 'study' is {declared}, but {', '.join(map(repr, keys))} "
                                f"{'is a key' if len(keys) == 1 else 'are keys'} of 'study: {other}'; "
                                "correct 'study' or drop them")
        return declared
    implied = [kind for kind, keys in distinct.items() if keys]
    if len(implied) != 1:
        mixed = "; ".join(f"{', '.join(map(repr, distinct[kind]))} of '{kind}'" for kind in implied)
        raise UserError(f"{path}: 'study' is missing and the keys do not tell which study this is"
                        f"{f' ({mixed})' if mixed else ''}; add {' or '.join(f'study: {k}' for k in STUDIES)}")
    kind = implied[0]
    log(f"{path}: no 'study' key, so the study type '{kind}' was inferred from its keys "
        f"({', '.join(distinct[kind])}); declare it with 'study: {kind}'")
    return kind
