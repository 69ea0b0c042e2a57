"""arrow: LoRA experts of one base kept separate, routed per token by PEFT's Arrow (Ostapenko et al. 2024).

Made by `expandlm merge` with `method: arrow` from LoRA adapters trained on one base (one per domain),
not trained by `adapt`. Arrow needs no training: each adapter's prototype, per layer, is the top right
singular vector of its update BA; each token's hidden state picks the `top_k` adapters whose prototypes
it aligns with most (|cosine|), weighted by a softmax at `router_temperature`. The folder keeps the
adapters under `experts/`, so it is self-contained; every domain is served by the one routed model.
"""
from peft import ArrowConfig, create_arrow_model
from transformers import AutoModelForCausalLM

from ..config import arg, config
from ..errors import UserError
from . import Strategy, register

EXPERTS = "experts"  # the folder's subfolder of adapters, one per expert, in the card's order


@register
class Arrow(Strategy):
    name = "arrow"
    summary = "LoRA experts routed per token by their prototypes (PEFT's Arrow; made by `merge`)"
    supports_vocab_expansion = False
    adaptable_again = False

    @config
    class Options:
        top_k: int = arg(1, "adapters mixed per token")
        router_temperature: float = arg(1.0, "softmax temperature over the top-k alignments")

    def build(self, base, ctx):
        raise UserError("arrow combines LoRA adapters that are already trained: make it with "
                        "`expandlm merge` (method: arrow), not with `adapt`")

    def load(self, folder, card):
        base = folder.path / card["base"]
        if not (base / "config.json").exists():
            raise UserError(f"{folder.path}: its base model {base.resolve()} is missing (the adapters need their base)")
        paths = [str(folder.path / EXPERTS / name) for name in card["experts"]]
        config = ArrowConfig(top_k=self.options.top_k, router_temperature=self.options.router_temperature)
        return create_arrow_model(AutoModelForCausalLM.from_pretrained(base), paths, config)

    def export(self, model, card, domain):
        raise UserError("an arrow model routes every token among its adapters, so no one set of weights computes it; "
                        "export one of its experts instead")
