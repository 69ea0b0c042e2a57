"""expand_paths: block expansion whose new blocks sit on the new domain's path only.

The model is the expanded one of `expand`; `expandlm.json` records each domain's path (the layer
indices it runs). Old domains run exactly their original blocks, so their outputs are bit-for-bit
those of the old expert; the new domain runs every block. `serving.select_domain` applies the path.
"""
from dataclasses import dataclass

from . import AdaptContext, register
from .expand import Expand


@register
@dataclass
class ExpandPaths(Expand):
    name = "expand_paths"
    summary = "as expand, but the new blocks run only for B: A's outputs are unchanged"

    def card(self, ctx: AdaptContext):
        card = super().card(ctx)
        everything = sorted(self.old_layers + self.new_layers)
        card["paths"] = {d: (everything if d == ctx.new_domain.name else self.old_layers) for d in ctx.domains}
        return card
