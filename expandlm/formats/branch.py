"""branch: the new domains' own model (a standard checkpoint with its own tokenizer) beside a reference
to the base folder that serves every old domain, loaded as the model folder it is (in its own format).

A chain stories → +recipes → +code loads each folder once, and every old domain runs exactly as it did
in its own folder.
"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from .format import Format


class BranchModels(torch.nn.Module):
    """The folder's own domains' model and the base folder's model (modules, so `.to()` and `.eval()` reach
    both); `base` is the base's `ServedModel`, which serves and exports the old domains."""

    def __init__(self, own: dict[str, torch.nn.Module], base):
        super().__init__()
        self.own = torch.nn.ModuleDict(own)
        self.base_model = base.model
        self.base = base


class Branch(Format):
    name = "branch"
    one_set_of_weights = False  # a model per domain: no one set of weights to continue
    serves_old_from_base = True

    def save(self, model, folder):
        if isinstance(model, PeftModel):  # adapters trained on the branch are its own: fold them into its weights
            model = model.merge_and_unload()
        folder.save(model.save_pretrained)

    def load(self, folder, card, open_base):
        base = self.base_folder(folder, card)
        new = AutoModelForCausalLM.from_pretrained(folder.path)
        return BranchModels({d: new for d in card.detail("own_domains")}, open_base(base))

    def serve(self, model, card, domain):
        return model.own[domain] if domain in model.own else model.base.for_domain(domain)

    def export(self, model, card, domain):
        return model.own[domain] if domain in model.own else model.base.export_model(domain)

    def tokenizer_folder(self, folder, card, domain, of_base):
        if domain in card.detail("own_domains"):
            return folder.path
        return of_base(self.base_folder(folder, card), domain)
