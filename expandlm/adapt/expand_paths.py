"""expand_paths: block expansion whose new blocks sit on the new domain's path only.

The model is the expanded one of `expand`, stored in the `paths` format: `expandlm.json` records each
domain's path (the blocks it runs), and serving gates the blocks, so old domains compute exactly what
the old expert computed, bit for bit, while the new domain runs every block.
"""
from .method import AdaptContext, Adapted
from .expand import Expand


class ExpandPaths(Expand):
    name = "expand_paths"
    format = "paths"
    keeps_old_domains = True

    def card(self, adapted: Adapted, ctx: AdaptContext):
        old, new = adapted.state["old_layers"], adapted.state["new_layers"]
        every = sorted(old + new)
        return {**super().card(adapted, ctx),
                "paths": {d: (every if d == ctx.new_domain.name else old) for d in ctx.domains}}
