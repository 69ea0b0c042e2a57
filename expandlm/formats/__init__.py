"""Folder formats: how a model folder is stored and served (see `format.py`), one file each. A training
method (`adapt/`) names the format it produces; merge, distill and export produce formats too."""
from ..errors import UserError
from ..records import MODEL_CARD, ModelCard
from .adapter import Adapter
from .arrow import Arrow
from .branch import Branch
from .checkpoint import Checkpoint
from .format import Format
from .paths import Paths

FORMATS: dict[str, type[Format]] = {f.name: f for f in (Checkpoint, Adapter, Paths, Branch, Arrow)}


def format_of(card: ModelCard) -> Format:
    if card.format not in FORMATS:
        raise UserError(f"{MODEL_CARD}: unknown format '{card.format}' (known: {', '.join(FORMATS)}); "
                        "was it written by a newer expandlm?")
    return FORMATS[card.format]()


__all__ = ["FORMATS", "Format", "format_of"]
