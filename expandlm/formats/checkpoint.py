"""checkpoint: one standard transformers checkpoint whose weights serve every domain (experts, full
fine-tunes, replay, EWC, joint training, block expansion, merges, distilled students, exports)."""
from .format import Format


class Checkpoint(Format):
    name = "checkpoint"
