"""branch: the new domains' own model beside a reference to the base folder that serves every old
domain, loaded as the model folder it is (in its own format).

The branch is built as a copy of the base's trunk (the model of the base's first domain) and trains
only part of it: its own embedding, head, final norm and new blocks, over the copied blocks frozen.
So the folder stores only what differs from the trunk (`branch.safetensors`, beside the branch's
`config.json` and tokenizer), and `expandlm.json` records the sha256 of the trunk weights it shares:
a base that changed since is refused, and loading puts the trunk's own tensors into the branch, so a
base and every branch grown from it hold the trunk once in memory. `expandlm export --domain D`
writes the branch whole, as a standard checkpoint. Branches stored whole (older folders) still load.

A chain stories → +recipes → +code loads each folder once, and every old domain runs exactly as it did
in its own folder.
"""
import dataclasses
import hashlib

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..errors import UserError
from ..model.blocks import decoder_blocks
from .format import Format

WEIGHTS = "branch.safetensors"  # what the branch trained; the rest of it is its base's trunk


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

    def save(self, model, folder, card, start=None):
        if isinstance(model, PeftModel):  # adapters trained on the branch are its own: fold them into its weights
            model = model.merge_and_unload()
        if start is None:  # nothing to share: the branch whole
            return super().save(model, folder, card)
        trunk = dict(start.named_parameters())
        shared = _shared_with_trunk(model, trunk, card.detail("new_layers"))
        own = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n not in shared}

        def write(path):
            model.config.save_pretrained(path)
            model.generation_config.save_pretrained(path)
            save_file(own, path / WEIGHTS, metadata={"format": "pt"})
        folder.save(write)
        return dataclasses.replace(card, details={**card.details, "trunk_sha256": trunk_digest(trunk, shared.values())})

    def load(self, folder, card, open_base):
        base = open_base(self.base_folder(folder, card))
        if (folder / WEIGHTS).exists():
            new = self._assemble(folder, card, base.export_model(card.domains[0]))
        else:  # stored whole
            new = AutoModelForCausalLM.from_pretrained(folder.path)
        return BranchModels({d: new for d in card.detail("own_domains")}, base)

    def serve(self, model, card, domain):
        return model.own[domain] if domain in model.own else model.base.for_domain(domain)

    def export(self, model, card, domain):
        return model.own[domain] if domain in model.own else model.base.export_model(domain)

    def tokenizer_folder(self, folder, card, domain, of_base):
        if domain in card.detail("own_domains"):
            return folder.path
        return of_base(self.base_folder(folder, card), domain)

    def _assemble(self, folder, card, trunk_model) -> torch.nn.Module:
        """The branch from its own tensors and the trunk's: the trunk's are put in, not copied."""
        config = AutoConfig.from_pretrained(folder.path)
        with init_empty_weights():  # no memory for the weights that come from the trunk
            model = AutoModelForCausalLM.from_config(config)
        _tie(model)
        try:
            own = load_file(folder / WEIGHTS)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder / WEIGHTS}: not a complete safetensors file ({e}; truncated or damaged)") from None
        trunk = dict(trunk_model.named_parameters())
        blocks = trunk_blocks(config.num_hidden_layers, card.detail("new_layers"))
        prefix = decoder_blocks(model)[1]
        shared = {n: trunk_name(n, blocks, prefix) for n, _ in model.named_parameters() if n not in own}
        if any(t not in trunk for t in shared.values()) or trunk_digest(trunk, shared.values()) != card.detail(
                "trunk_sha256"):
            raise UserError(f"{folder.path}: its base {self.base_folder(folder, card).resolve()} is not the model this "
                            f"branch was trained on (its trunk's weights differ from the sha256 that {card.where} "
                            "records); restore that base, or adapt the changed base again")
        for name, _ in list(model.named_parameters()):
            param = torch.nn.Parameter(own[name], requires_grad=False) if name in own else trunk[shared[name]]
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, param)
        _tie(model)
        if (folder / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(folder.path)
        return model.eval()


def _tie(model) -> None:
    """A tied head is the embedding (an empty model's may not be tied yet; one parameter, stored once)."""
    if model.config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def trunk_blocks(num_blocks: int, new_blocks: list[int]) -> dict[int, int]:
    """The branch's copied blocks: branch block index → the trunk block it is a copy of (in order)."""
    copied = [i for i in range(num_blocks) if i not in set(new_blocks)]
    return {i: j for j, i in enumerate(copied)}


def trunk_name(name: str, blocks: dict[int, int], prefix: str) -> str | None:
    """The trunk parameter a branch parameter was copied from (None: a new block's); `prefix` names the
    blocks' parameters (`decoder_blocks`: Llama's "model.layers.", GPT-2's "transformer.h.")."""
    index, dot, rest = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
    if not (index.isdigit() and dot):
        return name
    i = int(index)
    return f"{prefix}{blocks[i]}.{rest}" if i in blocks else None


def _shared_with_trunk(model, trunk: dict, new_blocks: list[int]) -> dict[str, str]:
    """Branch parameter → trunk parameter, for each one still exactly the trunk's it was copied from."""
    blocks = trunk_blocks(model.config.num_hidden_layers, new_blocks)
    prefix = decoder_blocks(model)[1]
    shared = {}
    for name, p in model.named_parameters():
        t = trunk.get(trunk_name(name, blocks, prefix))
        if t is not None and t.shape == p.shape and t.dtype == p.dtype and torch.equal(t.detach().cpu(), p.detach().cpu()):
            shared[name] = trunk_name(name, blocks, prefix)
    return shared


def trunk_digest(trunk: dict, names) -> str:
    """sha256 of the named trunk tensors (names, dtypes and bytes): what a branch must find in its base."""
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        tensor = trunk[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
