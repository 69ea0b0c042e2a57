"""lora: PEFT LoRA adapters on the old expert, trained on B; the base weights stay as they were.

The adapter is saved in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), so
`PeftModel.from_pretrained(base, out)` loads it. Requests for an old domain run with the adapter off,
which is exactly the old expert; requests for the new domain run with it on.
"""
from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model

from . import AdaptContext, Strategy, register

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@register
@dataclass
class LoRA(Strategy):
    name = "lora"
    summary = "low-rank adapters on every linear layer, trained on B"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(ALL_LINEAR))

    def build(self, base, ctx: AdaptContext):
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, task_type="CAUSAL_LM")
        return get_peft_model(base, config)

    def card(self, ctx: AdaptContext):
        card = super().card(ctx)
        card["adapter"] = {d: d == ctx.new_domain.name for d in ctx.domains}  # domain → adapter on?
        return card
