"""adapter: a PEFT LoRA adapter over its base folder (`PeftModel.from_pretrained(base, folder)` loads it).

Requests for a domain the adapter is off for run with it off (PEFT's per-request
`adapter_names=["__base__"]`, so the shared model is never switched): exactly the base model.
"""
import copy

from peft import PeftModel
from transformers import AutoModelForCausalLM

from ..errors import UserError
from ..model.paths import DomainView
from .format import Format

ADAPTER = "default"  # PEFT's name of the adapter it creates


class Adapter(Format):
    name = "adapter"
    one_set_of_weights = False

    def load(self, folder, card, open_base):
        base = self.base_folder(folder, card)
        if not (base / "config.json").exists():
            raise UserError(f"{folder.path}: its base model {base.resolve()} is missing (a LoRA adapter needs its base)")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder.path)

    def serve(self, model, card, domain):
        adapter = ADAPTER if card.detail("adapter")[domain] else "__base__"
        return DomainView(model, domain, lambda batch_size: {"adapter_names": [adapter] * batch_size})

    def export(self, model, card, domain):
        copied = copy.deepcopy(model)
        return (copied.merge_and_unload() if card.detail("adapter")[domain] else copied.unload()).eval()
