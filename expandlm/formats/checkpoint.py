"""checkpoint: one standard transformers checkpoint whose weights serve every domain (experts, full
fine-tunes, replay, EWC, joint training, block expansion, merges, distilled students, exports).

A folder that transformers saved without expandlm's card (a pretrained model, a user's fine-tune) is one
too: its own behaviour is one plain domain, requested as its own tokenizer starts a text, with nothing
of its tokenizer changed (`pretrained_card`)."""
from ..records import ModelCard
from .format import Format

BASE_DOMAIN = "base"  # what a pretrained checkpoint's own behaviour is called unless `--base-domain` names it
PRETRAINED = "pretrained"  # the method of a card-less checkpoint (`pretrained_card`)


class Checkpoint(Format):
    name = "checkpoint"


def pretrained_card(base_domain: str = BASE_DOMAIN) -> ModelCard:
    """The card of a checkpoint folder that has none: its one domain, plain (no tag token)."""
    return ModelCard(domains=[base_domain], plain=[base_domain], format=Checkpoint.name, method=PRETRAINED)
