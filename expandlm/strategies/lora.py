"""lora: PEFT LoRA adapters on the old expert, trained on B; the base weights stay as they were.

The adapter is saved in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), so
`PeftModel.from_pretrained(base, out)` loads it. Requests for an old domain run with the adapter off
(PEFT's per-request `adapter_names=["__base__"]`, so the shared model is never switched), which is
exactly the old expert; requests for the new domain run with it on.
"""
import copy

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from ..config import arg, config
from ..errors import UserError
from ..model import DomainView
from . import Adapted, AdaptContext, Strategy, register

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = "default"  # PEFT's name of the adapter it creates


@register
class LoRA(Strategy):
    name = "lora"
    summary = "low-rank adapters on every linear layer, trained on B"
    supports_vocab_expansion = False  # the new embedding rows would have to live outside the adapter
    keeps_old_domains = True
    adaptable_again = False

    @config
    class Options:
        r: int = arg(16, "rank of the adapters")
        alpha: int = arg(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
        dropout: float = arg(0.0, "dropout on the adapters' input")
        target_modules: list[str] = arg(help="modules that get adapters (comma-separated on the command line)",
                                        factory=lambda: list(ALL_LINEAR))

    def build(self, base, ctx: AdaptContext):
        config = LoraConfig(r=self.options.r, lora_alpha=self.options.alpha, lora_dropout=self.options.dropout,
                            target_modules=list(self.options.target_modules), task_type="CAUSAL_LM")
        try:
            return Adapted(get_peft_model(base, config))
        except ValueError as e:  # PEFT names the target modules it could not find
            raise UserError(f"strategy 'lora': {e}") from None

    def card(self, adapted: Adapted, ctx: AdaptContext):
        return {"adapter": {d: d == ctx.new_domain.name for d in ctx.domains}}  # domain → adapter on?

    def load(self, folder, card):
        base = folder.path / card["base"]
        if not (base / "config.json").exists():
            raise UserError(f"{folder.path}: its base model {base.resolve()} is missing (a LoRA adapter needs its base)")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder.path)

    def serve(self, model, card, domain):
        adapter = ADAPTER if card["adapter"][domain] else "__base__"
        return DomainView(model, domain, lambda batch_size: {"adapter_names": [adapter] * batch_size})

    def export(self, model, card, domain):
        copied = copy.deepcopy(model)
        return (copied.merge_and_unload() if card["adapter"][domain] else copied.unload()).eval()
