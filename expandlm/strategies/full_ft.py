"""full_ft: the old expert simply continues training on the new domain (the paper's forgetting case)."""
from . import Strategy, register


@register
class FullFineTune(Strategy):
    name = "full_ft"
    summary = "every parameter trained on B"
