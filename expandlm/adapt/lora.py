"""lora: PEFT LoRA adapters on the old expert, trained on B; the base weights stay as they were.

Stored in the `adapter` format (PEFT's own files, so `PeftModel.from_pretrained(base, out)` loads it):
requests for an old domain run with the adapter off, exactly the old expert; requests for the new
domain run with it on.
"""
from peft import LoraConfig, get_peft_model

from ..config import arg, config
from ..errors import UserError
from ..model.blocks import block_linear_names
from ..process import log
from .method import AdaptContext, Adapted, Method

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # a Llama block's


class LoRA(Method):
    name = "lora"
    format = "adapter"
    supports_vocab_expansion = False  # the new embedding rows would have to live outside the adapter
    keeps_old_domains = True

    @config
    class Options:
        r: int = arg(16, "rank of the adapters")
        alpha: int = arg(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
        dropout: float = arg(0.0, "dropout on the adapters' input")
        target_modules: list[str] = arg(help="modules that get adapters (comma-separated on the command line; "
                                        "default: every linear layer of the blocks, named as the architecture "
                                        "names them: Llama's q/k/v/o and gate/up/down_proj, GPT-2's c_attn, c_proj "
                                        "and c_fc)",
                                        factory=lambda: list(ALL_LINEAR))

    def build(self, base, ctx: AdaptContext):
        targets = list(self.options.target_modules)
        if targets == ALL_LINEAR:  # the default: a Llama block's linear layers, or another architecture's own
            targets = block_linear_names(base)
            if set(targets) != set(ALL_LINEAR):
                log(f"lora on every linear layer of the blocks of {type(base).__name__}: {', '.join(targets)}")
        config = LoraConfig(r=self.options.r, lora_alpha=self.options.alpha, lora_dropout=self.options.dropout,
                            target_modules=targets, task_type="CAUSAL_LM")
        try:
            return Adapted(get_peft_model(base, config))
        except ValueError as e:  # PEFT names the target modules it could not find
            raise UserError(f"method 'lora': {e}") from None

    def card(self, adapted: Adapted, ctx: AdaptContext):
        return {"adapter": {d: d == ctx.new_domain.name for d in ctx.domains}}  # domain → adapter on?
