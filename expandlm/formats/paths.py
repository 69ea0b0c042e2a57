"""paths: one checkpoint whose blocks are gated per domain: `expandlm.json` records each domain's path
(the blocks it runs). Off a domain's path a block passes its input through (`model.paths.gate_blocks`),
so a domain computes exactly what its blocks compute, bit for bit; `export` writes one domain's path
as a standard checkpoint."""
from ..model.paths import DomainView, gate_blocks, path_model
from .format import Format


class Paths(Format):
    name = "paths"
    one_set_of_weights = False  # a path per domain over paths is not implemented yet

    def load(self, folder, card, open_base):
        model = super().load(folder, card, open_base)
        gate_blocks(model, card.detail("paths"))
        return model

    def serve(self, model, card, domain):
        return DomainView(model, domain)

    def export(self, model, card, domain):
        return path_model(model, card.detail("paths")[domain])
