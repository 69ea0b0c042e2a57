"""expand_paths: block expansion whose new blocks sit on the new domain's path only.

The model is the expanded one of `expand`; `expandlm.json` records each domain's path (the blocks it
runs). Serving gates the blocks (`model.gate_blocks`): off a domain's path a block passes its input
through, so old domains compute exactly what the old expert computed, bit for bit, while the new
domain runs every block. `export` writes one domain's path as a standard checkpoint.
"""
from ..model import DomainView, gate_blocks, path_model
from . import Adapted, AdaptContext, register
from .expand import Expand


@register
class ExpandPaths(Expand):
    name = "expand_paths"
    summary = "as expand, but the new blocks run only for B: A's outputs are unchanged"
    keeps_old_domains = True
    adaptable_again = False  # a path per domain over paths is not implemented yet

    def card(self, adapted: Adapted, ctx: AdaptContext):
        old, new = adapted.state["old_layers"], adapted.state["new_layers"]
        every = sorted(old + new)
        return {**super().card(adapted, ctx),
                "paths": {d: (every if d == ctx.new_domain.name else old) for d in ctx.domains}}

    def load(self, folder, card):
        model = super().load(folder, card)
        gate_blocks(model, card["paths"])
        return model

    def serve(self, model, card, domain):
        return DomainView(model, domain)

    def export(self, model, card, domain):
        return path_model(model, card["paths"][domain])
