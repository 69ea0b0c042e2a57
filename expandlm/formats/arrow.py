"""arrow: LoRA experts of one base kept apart, routed per token by PEFT's Arrow (Ostapenko et al. 2024).

Made by `expandlm merge` with `method: arrow` from LoRA adapters trained on one base (one per domain).
Each adapter's prototype, per layer, is the top right singular vector of its update BA; each token's
hidden state picks the `top_k` adapters whose prototypes it aligns with most (|cosine|), weighted by a
softmax at `router_temperature` (the card's `options`). The folder keeps the adapters under `experts/`,
so it is self-contained; every domain is served by the one routed model, except one the card's `adapter`
marks off: a card-less checkpoint's own domain, which none of its adapters trained, runs the base alone.
"""
from peft import ArrowConfig, create_arrow_model
from transformers import AutoModelForCausalLM

from ..errors import UserError
from ..model.paths import DomainView
from .format import Format

EXPERTS = "experts"  # the folder's subfolder of adapters, one per expert, in the card's order


class Arrow(Format):
    name = "arrow"
    one_set_of_weights = False
    exportable = False

    def load(self, folder, card, open_base):
        base = self.base_folder(folder, card)
        if not (base / "config.json").exists():
            raise UserError(f"{folder.path}: its base model {base.resolve()} is missing (the adapters need their base)")
        paths = [str(folder.path / EXPERTS / name) for name in card.detail("experts")]
        # a fixed seed for the power iteration that finds each prototype: with PEFT's default (the global
        # generator) two loads of one folder differed by ~1e-4 in their logits
        config = ArrowConfig(top_k=card.options.get("top_k", 1),
                             router_temperature=card.options.get("router_temperature", 1.0), rng_seed=0)
        return create_arrow_model(AutoModelForCausalLM.from_pretrained(base), paths, config)

    def serve(self, model, card, domain):
        if card.details.get("adapter", {}).get(domain, True):  # folders before `adapter` route every domain
            return model
        return DomainView(model, domain, lambda batch_size: {"adapter_names": ["__base__"] * batch_size})

    def export(self, model, card, domain):
        raise UserError("an arrow model routes every token among its adapters, so no one set of weights computes it; "
                        "export one of its experts instead")
