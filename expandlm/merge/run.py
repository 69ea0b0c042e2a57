"""Model merging: `expandlm merge CONFIG.yaml --out DIR`.

Experts fine-tuned separately from one common start become one model. The config is mergekit's shape:

    method: ties                   # linear | task_arithmetic | ties | dare_linear | dare_ties | fisher | regmean
    base: runs/stories-expert      # the common start (task arithmetic, TIES and DARE merge its deltas)
    models:
      - {model: runs/recipes-ft, weight: 1.0}
      - {model: runs/code-ft, weight: 1.0}
    parameters: {density: 0.5}

Full checkpoints merge weight by weight; the arithmetic of task vectors, TIES and DARE is PEFT's
(`peft.utils.merge_utils`). LoRA adapters of one base merge into one adapter through PEFT's
`add_weighted_adapter`. Fisher merging (Matena & Raffel 2022) and RegMean (Jin et al. 2023) depend on
data, which no maintained library merges with (mergekit has neither), so they are written here: each
expert's statistics come from its own domain's training data, found through its run record. An
adapter given to them is merged into its base first, so their output is a full checkpoint.

The output is a standard folder (`AutoModelForCausalLM`, or `PeftModel` for an adapter) whose card
serves every domain its models served, one set of weights for all.

Models grown from a checkpoint that transformers saved (no expandlm.json) merge too, with the checkpoint
itself as `base` or among `models`: its own domain keeps the name they give it; merged adapters leave it
off (plain domains have no tag to tell it apart, so only that keeps it the checkpoint); full models whose
tokenizers each appended their own tags at one id are laid out on one tokenizer first (`on_vocabulary`).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..atomic import files_into
from ..config import arg, build, config, load_yaml
from ..data.corpus import load_train_val
from ..data.shards import PackedBatches, build_shard, default_cache_dir
from ..data.vocab import with_tag
from ..domains import Domain, get_domain, is_spec_path, save_specs
from ..errors import UserError
from ..formats import format_of
from ..formats.adapter import Adapter
from ..formats.arrow import EXPERTS, Arrow
from ..formats.checkpoint import BASE_DOMAIN
from ..formats.format import BASE_GGUF_SHA256
from ..formats.gguf_input import gguf_file
from ..formats.served import ServedModel, check_tokenizers, load_served
from ..model.blocks import decoder_blocks
from ..process import log
from ..records import MODEL_CARD, ModelCard
from ..run_folder import RunFolder
from ..training.fisher import diagonal_fisher
from ..training.run import Run

DELTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")   # merge task vectors: need a base
DATA_METHODS = ("fisher", "regmean")                                       # weigh by each expert's own data
METHODS = ("linear", *DELTA_METHODS, *DATA_METHODS, "arrow")   # arrow: adapters kept, routed per token
# how PEFT's add_weighted_adapter does each method on LoRA adapters: `cat` stacks the ranks, so it is
# exactly the sum of the weighted updates; TIES and DARE act on the full updates, then SVD back to a rank
ADAPTER_COMBINATION = {"linear": "linear", "task_arithmetic": "cat", "ties": "ties_svd",
                       "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd"}


@config
class MergeModel:
    model: str = arg(help="a model folder: a full checkpoint or a LoRA adapter written by expandlm", path=True)
    weight: float = arg(1.0, "the model's weight in the merge")
    domain: str | None = arg(None, "the domain it is the expert of, whose data Fisher and RegMean read "
                                   "(default: the last domain its card serves)")


@config
class MergeParameters:
    density: Annotated[float, Field(gt=0, le=1)] = arg(0.5, "TIES/DARE: the share of each task vector kept")
    majority_sign_method: Literal["total", "frequency"] = arg("total", "TIES: how the sign of each weight is elected")
    normalize: bool = arg(True, "linear: divide by the sum of the weights (a weighted average)")
    windows: Annotated[int, Field(gt=0)] = arg(64, "Fisher/RegMean: training windows of each expert's domain")
    fisher_floor: Annotated[float, Field(ge=0)] = arg(1e-8, "Fisher: added to every Fisher value (no 0/0)")
    regmean_alpha: Annotated[float, Field(ge=0, le=1)] = arg(0.9, "RegMean: scale of the Gram matrices' "
                                                                   "off-diagonal (1: plain least squares)")
    svd_rank: Annotated[int, Field(gt=0)] | None = arg(None, "adapters, TIES/DARE: rank of the merged adapter "
                                                            "(default: the sum of the adapters' ranks)")
    seed: int = arg(0, "DARE: seed of the random drops")
    top_k: Annotated[int, Field(gt=0)] = arg(1, "arrow: adapters mixed per token")
    router_temperature: Annotated[float, Field(gt=0)] = arg(1.0, "arrow: softmax temperature of the routing")


# The parameters each method reads, as each of mergekit's merge methods declares its own: a parameter
# given to a method that does not read it is refused, so a setting never passes silently unused. `seed`
# belongs to every method (the run record's seed; DARE's drops; the windows Fisher and RegMean read).
METHOD_PARAMETERS = {
    "linear": ("normalize",),
    "task_arithmetic": (),
    "ties": ("density", "majority_sign_method", "svd_rank"),
    "dare_linear": ("density", "svd_rank"),
    "dare_ties": ("density", "majority_sign_method", "svd_rank"),
    "fisher": ("windows", "fisher_floor"),
    "regmean": ("windows", "regmean_alpha"),
    "arrow": ("top_k", "router_temperature"),
}


def merge_parameters(method: str, given: dict, where: str) -> MergeParameters:
    """`given` parameters of `method`, checked: known, of the right type, and read by that method."""
    parameters = build(MergeParameters, given, where)
    takes = {"seed", *METHOD_PARAMETERS.get(method, ())}
    unused = [k for k in given if k not in takes]
    if unused:
        raise UserError(f"{where}: method '{method}' does not read {', '.join(repr(k) for k in unused)} "
                        f"(its parameters: {', '.join(sorted(takes))})")
    return parameters


@config
class MergeConfig:
    method: Literal[METHODS] = arg(help="how the models are combined (arrow: LoRA adapters kept apart, routed per token)")
    models: list[MergeModel] = arg(help="the experts to merge", factory=list)
    base: str | None = arg(None, "the common start the experts were fine-tuned from (task arithmetic, TIES, DARE)",
                           path=True)
    parameters: MergeParameters = arg(help="the method's settings", factory=MergeParameters)


def load_merge_config(path: str | Path) -> MergeConfig:
    data = load_yaml(path)
    cfg = build(MergeConfig, data, str(path))
    given = data.get("parameters") if isinstance(data, dict) else None
    merge_parameters(cfg.method, given if isinstance(given, dict) else {}, f"{path}: parameters")
    root = Path(path).parent
    for m in cfg.models:  # a model's path is relative to the config
        m.model = str(root / m.model) if not Path(m.model).is_absolute() else m.model
    if cfg.base is not None and not Path(cfg.base).is_absolute():
        cfg.base = str(root / cfg.base)
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: MergeConfig, where: str) -> None:
    if len(cfg.models) < 2:
        raise UserError(f"{where}: 'models' lists {len(cfg.models)} model(s); a merge needs at least 2")
    if cfg.method in DELTA_METHODS and cfg.base is None:
        raise UserError(f"{where}: method '{cfg.method}' merges task vectors (model − base) and needs 'base': "
                        "the model the experts were fine-tuned from")
    for i, m in enumerate(cfg.models):
        if m.domain is not None and is_spec_path(m.domain):  # a name is checked against its model's folder
            get_domain(m.domain)
        if not Path(m.model).is_dir() and gguf_file(m.model) is None:
            raise UserError(f"{where}: models[{i}]: {m.model} is not a model folder or GGUF file")


# -- loading and checking the models ---------------------------------------------------------------

def is_adapter(served: ServedModel) -> bool:
    return served.card.format == Adapter.name


def own_domain_name(cfg: MergeConfig) -> str:
    """What a card-less checkpoint in the config serves: its own domain, named as the models grown from it
    name it (a card's first plain domain: adapt lists the base's domains first), else `base`."""
    for path in [*(m.model for m in cfg.models), cfg.base]:
        if path is not None and (Path(path) / MODEL_CARD).is_file():
            plain = RunFolder(path).card().plain
            if plain:
                return plain[0]
    return BASE_DOMAIN


def _load(path: str, what: str, own_domain: str = BASE_DOMAIN) -> ServedModel:
    try:
        served = load_served(path, device="cpu", base_domain=own_domain)
    except UserError as e:  # the folder's own words, with the entry that named it
        raise UserError(f"{what}: {e}") from None
    one_set = served.format.one_set_of_weights or is_adapter(served)
    if not one_set:
        raise UserError(f"{what}: {path} is a {served.card.format} model, whose domains run different weights; "
                        "merge one set of weights (export a domain first: expandlm export)")
    return served


def _appended_tags_union(models: list[ServedModel]):
    """One tokenizer for models whose tokenizers differ only by the tags of their own domains appended
    after a shared vocabulary (adapt over a card-less checkpoint appends a new domain's tag at the next id,
    so two models grown from it have different tags at one id): the shared vocabulary, then every tag once.
    None where the tokenizers are one, or differ otherwise."""
    vocabs = [s.tokenizer.get_vocab() for s in models]
    if all(v == vocabs[0] for v in vocabs[1:]):
        return None
    tokens = [{i: t for t, i in v.items()} for v in vocabs]
    shared = 0
    while shared in tokens[0] and all(ids.get(shared) == tokens[0][shared] for ids in tokens):
        shared += 1
    for served, ids in zip(models, tokens):
        tags = {served.domain(d).tag for d in served.domains if d not in served.card.plain}
        if any(t not in tags for i, t in ids.items() if i >= shared):
            return None
    union = models[0].tokenizer
    for ids in tokens[1:]:
        for i in sorted(i for i in ids if i >= shared):
            if ids[i] not in union.get_vocab():
                union = with_tag(union, ids[i])
    return union


def common_tokenizer(models: list[ServedModel], names: list[str], tags_may_differ: bool = True):
    """The merged model's tokenizer: the models' one, or (`tags_may_differ`) the union of their appended
    domain tags (`_appended_tags_union`); any other difference is refused."""
    union = _appended_tags_union(models) if tags_may_differ else None
    if union is None:
        check_tokenizers(models, names)
        return models[0].tokenizer
    return union


def on_vocabulary(model: torch.nn.Module, own, tokenizer) -> torch.nn.Module:
    """`model` with its embedding (and an untied head) laid out by `tokenizer`'s ids, which extend its own
    `own` by tags: a token it has keeps its row (moved to its id there), a tag it never had starts at the
    mean of its rows, as adapt starts a new tag's embedding (data/vocab.py, `grow_embeddings`). So a base's
    tag row is exactly where a fine-tune's embedding row began, and a task vector there is what it learned."""
    vocab, target = own.get_vocab(), tokenizer.get_vocab()
    if vocab == target:
        return model
    shared = min(target[t] for t in target if vocab.get(t) != target[t])
    old = [m.weight.detach().clone() for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    model = copy.deepcopy(model)
    rows = max(len(target), old[0].shape[0])
    model.resize_token_embeddings(rows, mean_resizing=False)  # sets config.vocab_size; re-ties a tied head
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for layer, weight in zip(layers, old):
            mean = weight[:len(vocab)].mean(dim=0)  # its tokens' rows, not padding: where adapt starts a tag
            placed = torch.cat([weight, mean.expand(rows - len(weight), -1)])  # a new tensor: `weight` is read below
            for token, i in target.items():
                if i >= shared:
                    placed[i] = weight[vocab[token]] if token in vocab else mean
            layer.weight.copy_(placed)
    return model


def plain_domains(models: list[ServedModel], names: list[str], domains: list[str]) -> list[str]:
    """The domains requested with no tag token, as their models request them; a domain one model requests
    plain and another by its tag is refused (one merged set of weights is requested one way)."""
    plain = [d for d in domains if any(d in s.card.plain for s in models)]
    for d in plain:
        tagged = [n for s, n in zip(models, names) if d in s.domains and d not in s.card.plain]
        if tagged:
            untagged = [n for s, n in zip(models, names) if d in s.card.plain]
            raise UserError(f"{', '.join(untagged)} request '{d}' with no tag and {', '.join(tagged)} with its tag "
                            f"<|{d}|>; a merged model requests a domain one way: merge models that request it alike")
    return plain


def adapter_use(adapters: list[ServedModel], domains: list[str], plain: list[str]) -> dict[str, bool]:
    """Per domain, whether the merged adapters run for it: yes, except a plain domain every adapter left off.
    That is a card-less checkpoint's own domain (lora over it); requested as the merged plain domains are,
    only the adapter being off keeps it the checkpoint itself."""
    def off(d):
        return d in plain and all(not s.card.detail("adapter").get(d, True) for s in adapters if d in s.domains)
    return {d: not off(d) for d in domains}


def _check_shapes(states: list[dict[str, torch.Tensor]], names: list[str], paths: list[Path]) -> None:
    first = states[0]
    for state, name, path in zip(states[1:], names[1:], paths[1:]):
        if state.keys() != first.keys():
            odd = sorted(state.keys() ^ first.keys())[:3]
            raise UserError(f"{name} ({path}) has different parameters from {names[0]} ({paths[0]}), "
                            f"e.g. {', '.join(odd)}: only models of one architecture merge")
        for key, tensor in first.items():
            if state[key].shape != tensor.shape:
                raise UserError(f"{name} ({path}): parameter {key} has shape {tuple(state[key].shape)}, "
                                f"{names[0]} has {tuple(tensor.shape)}: only models of one shape merge")


def expert_domain(served: ServedModel, entry: MergeModel, what: str) -> str:
    domain = served.domain(entry.domain).name if entry.domain else (served.domains[-1] if served.domains else None)
    if domain is None:
        raise UserError(f"{what}: {served.path} names no domain; give the model's 'domain'")
    if served.domains and domain not in served.domains:
        raise UserError(f"{what}: {served.path} serves {', '.join(served.domains)}, not '{domain}'")
    return domain


def domain_batches(served: ServedModel, domain: str, windows: int, seed: int, what: str,
                   tokenizer=None) -> list[torch.Tensor]:
    """`windows` training windows of `domain`'s data (the data the run that made `served` recorded), in
    `tokenizer`'s ids (the merged model's; default the domain's own)."""
    data = served.domain_data().get(domain)
    if data is None:
        raise UserError(f"{what}: {served.path} has no record of its '{domain}' training data "
                        "(Fisher and RegMean read each expert's own data)")
    train_corpus, _ = load_train_val(data.train, served.domain(domain), data.val, data.limit, data.val_limit)
    shard = build_shard(train_corpus, tokenizer or served.tokenizer_for(domain), default_cache_dir())
    batches = PackedBatches([shard], served.model.config.max_position_embeddings, 1, seed)
    return [batches.batch(i) for i in range(windows)]


# -- the merges ------------------------------------------------------------------------------------

def merge_tensors(method: str, tensors: list[torch.Tensor], base: torch.Tensor | None, weights: torch.Tensor,
                  p: MergeParameters) -> torch.Tensor:
    """One parameter merged by a data-free method (PEFT's task-vector arithmetic, TIES and DARE)."""
    from peft.utils import merge_utils

    if method == "linear":
        w = weights / weights.sum() if p.normalize else weights
        return merge_utils.task_arithmetic(tensors, w)
    deltas = [t - base for t in tensors]
    if method == "task_arithmetic":
        merged = merge_utils.task_arithmetic(deltas, weights)
    elif method == "ties":
        merged = merge_utils.ties(deltas, weights, p.density, p.majority_sign_method)
    elif method == "dare_linear":
        merged = merge_utils.dare_linear(deltas, weights, p.density)
    else:
        merged = merge_utils.dare_ties(deltas, weights, p.density, p.majority_sign_method)
    return base + merged


def fisher_merge(models: list[torch.nn.Module], batches: list[list[torch.Tensor]], weights: torch.Tensor,
                 p: MergeParameters) -> dict[str, torch.Tensor]:
    """θ = Σ w_i F_i θ_i / Σ w_i F_i, F_i the diagonal empirical Fisher of expert i on its own data
    (squared per-window gradients, not normalised: the experts' Fishers weigh against each other)."""
    num = den = None
    for model, windows, w in zip(models, batches, weights):
        model.requires_grad_(True)  # an adapter merged into its base comes out frozen
        fisher = diagonal_fisher(model, windows, normalize=False)
        state = dict(model.named_parameters())
        f = {n: w * (fisher.get(n, torch.zeros_like(t)) + p.fisher_floor) for n, t in state.items()}
        term = {n: f[n] * t.detach() for n, t in state.items()}
        num = term if num is None else {n: num[n] + term[n] for n in num}
        den = f if den is None else {n: den[n] + f[n] for n in den}
    return {n: num[n] / den[n] for n in num}


def _gram_matrices(model: torch.nn.Module, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """XᵀX of the inputs of every linear layer of the decoder blocks, over `windows`."""
    grams, hooks = {}, []
    layers, prefix = decoder_blocks(model)  # "model.layers.", GPT-2's "transformer.h.", ...
    for name, module in layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, _out, key=f"{prefix}{name}.weight"):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x
            hooks.append(module.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[:, :-1])
    for h in hooks:
        h.remove()
    return grams


def regmean_merge(models: list[torch.nn.Module], batches: list[list[torch.Tensor]], weights: torch.Tensor,
                  p: MergeParameters) -> dict[str, torch.Tensor]:
    """RegMean: each linear layer of the blocks gets the weights that best reproduce every expert's
    outputs on its own inputs, W = (Σ G_i)⁻¹ Σ G_i W_i with G_i = XᵢᵀXᵢ (off-diagonal scaled by α);
    every other parameter (embeddings, norms) is the weighted average."""
    grams = [_gram_matrices(m, w) for m, w in zip(models, batches)]
    states = [{n: t.detach() for n, t in m.state_dict().items()} for m in models]
    avg = weights / weights.sum()
    merged = {n: sum(a * s[n] for a, s in zip(avg, states)) for n in states[0]}
    for key in grams[0]:
        lhs = rhs = 0
        for g, s, w in zip(grams, states, weights):
            g = g[key]
            g = p.regmean_alpha * g + (1 - p.regmean_alpha) * torch.diag(torch.diag(g))
            lhs, rhs = lhs + w * g, rhs + w * g @ s[key].double().T
        merged[key] = torch.linalg.lstsq(lhs, rhs).solution.T.to(states[0][key].dtype)
    return merged


def base_reference(card: ModelCard) -> dict:
    """The content reference of an adapter's base that a folder built on the same base carries on (a GGUF's)."""
    return {k: card.details[k] for k in (BASE_GGUF_SHA256,) if k in card.details}


def shared_base(adapters: list[ServedModel]) -> str:
    """The base model folder every adapter was trained on (adapters of different bases do not combine)."""
    bases = {s.folder.resolve(s.card.base) for s in adapters}
    if len(bases) > 1:
        raise UserError(f"the adapters were trained on different bases ({', '.join(sorted(bases))}); "
                        "adapters combine only over the base they share")
    return next(iter(bases))


def svd_rank(model: torch.nn.Module, rank: int, given: int | None) -> int:
    """The rank TIES/DARE's SVD returns the merged adapter to: at most what the narrowest adapted layer holds
    (min of its in and out features: a grouped-query k_proj is narrower than the rest). PEFT cuts that layer
    alone and still records the asked rank, so its folder would not load; a given rank above it is refused."""
    from peft.tuners.lora import LoraLayer

    layers = [(min(m.in_features, m.out_features), n.removeprefix("base_model.model."))
              for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    narrowest = min(layers, default=(rank, ""))
    if rank <= narrowest[0]:
        return rank
    if given is not None:
        raise UserError(f"parameters: svd_rank {given} is above {narrowest[0]}, the most that {narrowest[1]} "
                        "(in and out features) holds; give svd_rank at most that")
    log(f"merge: the merged adapter's rank is {narrowest[0]}, the most that {narrowest[1]} holds "
        f"(not the sum of the ranks, {rank})")
    return narrowest[0]


def _merged_adapter(served: list[ServedModel], cfg: MergeConfig) -> torch.nn.Module:
    """The adapters as one PEFT adapter, merged by PEFT's `add_weighted_adapter`."""
    from peft import PeftModel

    shared = shared_base(served)
    if cfg.base is not None and Path(cfg.base).resolve() != Path(shared).resolve():
        raise UserError(f"'base' is {cfg.base}, but the adapters were trained on {shared}")
    model = copy.deepcopy(served[0].model)
    names = [f"expert{i}" for i in range(len(served))]
    model.load_adapter(str(served[0].path), adapter_name=names[0])
    for name, s in zip(names[1:], served[1:]):
        model.load_adapter(str(s.path), adapter_name=name)
    if "default" in model.peft_config:
        model.set_adapter(names[0])
        model.delete_adapter("default")
    kind = ADAPTER_COMBINATION[cfg.method]
    p = cfg.parameters
    rank = p.svd_rank or sum(s.model.peft_config["default"].r for s in served)
    if kind.endswith("_svd"):  # linear and cat add the adapters as they are: no SVD
        rank = svd_rank(model, rank, p.svd_rank)
    torch.manual_seed(p.seed)
    weights = [m.weight for m in cfg.models]
    if cfg.method == "linear" and p.normalize:
        weights = [w / sum(weights) for w in weights]
    try:
        model.add_weighted_adapter(names, weights, "default", combination_type=kind, svd_rank=rank,
                                   density=p.density if cfg.method in ("ties", "dare_linear", "dare_ties") else None,
                                   majority_sign_method=p.majority_sign_method)
    except ValueError as e:  # PEFT says why (e.g. `linear` needs adapters of one rank)
        raise UserError(f"merging the adapters with '{cfg.method}' ({kind} in PEFT): {e}") from None
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    assert isinstance(model, PeftModel)
    return model


def merge(cfg: MergeConfig, out: str | Path, where: str | None = None) -> RunFolder:
    """Merge the config's models into the folder `out`; returns it. `where`, the config file, begins every
    refusal (each names its entry: models[i] or base)."""
    try:
        return _merge(cfg, out)
    except UserError as e:
        raise UserError(f"{where}: {e}" if where else str(e)) from None


def _merge(cfg: MergeConfig, out: str | Path) -> RunFolder:
    names = [f"models[{i}]" for i in range(len(cfg.models))]
    own = own_domain_name(cfg)
    served = [_load(m.model, n, own) for m, n in zip(cfg.models, names)]
    base = _load(cfg.base, "base", own) if cfg.base is not None else None
    everyone, every_name = served + ([base] if base else []), names + (["base"] if base else [])
    adapters = [is_adapter(s) for s in served]
    kept_adapters = all(adapters) and (cfg.method == "arrow" or cfg.method in ADAPTER_COMBINATION)
    tokenizer = common_tokenizer(everyone, every_name, tags_may_differ=not kept_adapters)
    domains = list(dict.fromkeys(d for s in everyone for d in s.domains))
    plain = plain_domains(everyone, every_name, domains)
    experts = [expert_domain(s, m, n) for s, m, n in zip(served, cfg.models, names)]
    domain_data = {}
    for s in everyone:
        domain_data.update({d: v for d, v in s.domain_data().items() if d not in domain_data})
    if cfg.method == "arrow":
        return _arrow_folder(served, cfg, adapters, names, domains, plain, experts, domain_data, out)
    if kept_adapters:
        model, kind = _merged_adapter(served, cfg), "adapter"
    else:
        model, kind = _merged_full(served, base, cfg, names, experts, tokenizer), "full"
    run = _new_run(cfg, out, tokenizer, _declared(everyone, domains))
    card = ModelCard(domains=domains, plain=plain, method="merge", preset=served[0].card.preset,
                     details={"merged": {"method": cfg.method, "experts": experts}})
    if kind == "adapter":
        card.format, card.base = Adapter.name, run.folder.portable(served[0].folder.resolve(served[0].card.base))
        card.details.update(base_reference(served[0].card))
        card.details["adapter"] = adapter_use(served, domains, plain)
    return _finish(run, model, cfg, card, kind, domain_data, len(served))


def _merged_full(served: list[ServedModel], base: ServedModel | None, cfg: MergeConfig, names: list[str],
                 experts: list[str], tokenizer) -> torch.nn.Module:
    """The models merged weight by weight into one full model, every one laid out by `tokenizer`'s ids."""
    adapters = [is_adapter(s) for s in served]
    if any(adapters) and not all(adapters) and cfg.method in ADAPTER_COMBINATION:
        raise UserError(f"{', '.join(n for n, a in zip(names, adapters) if a)} are LoRA adapters and the others "
                        "full models; merge adapters with adapters, or export each adapter's domain first")
    # a data-dependent merge of adapters works on the models they make (adapter merged into the base)
    models = [on_vocabulary(copy.deepcopy(s.model).merge_and_unload() if a else s.model, s.tokenizer, tokenizer)
              for s, a in zip(served, adapters)]
    states = [{n: t.detach() for n, t in m.state_dict().items()} for m in models]
    base_model = None
    if base is not None:
        base_model = on_vocabulary(base.model.merge_and_unload() if is_adapter(base) else base.model,
                                   base.tokenizer, tokenizer)
    base_state = base_model.state_dict() if base_model is not None else None
    _check_shapes(states + ([base_state] if base_state else []), names + ["base"] * bool(base_state),
                  [s.path for s in served + ([base] if base else [])])
    p, weights = cfg.parameters, torch.tensor([m.weight for m in cfg.models])
    if cfg.method in DATA_METHODS:
        batches = [domain_batches(s, d, p.windows, p.seed, n, tokenizer) for s, d, n in zip(served, experts, names)]
        log(f"merge: {cfg.method} statistics of {len(models)} experts on {p.windows} windows each")
        merged = (fisher_merge if cfg.method == "fisher" else regmean_merge)(models, batches, weights, p)
    else:
        torch.manual_seed(p.seed)  # DARE's drops
        merged = {n: merge_tensors(cfg.method, [s[n].float() for s in states],
                                   base_state[n].float() if base_state else None, weights, p).to(states[0][n].dtype)
                  for n in states[0]}
    model = copy.deepcopy(models[0])
    model.load_state_dict(merged, strict=False)  # tied weights share one tensor: either name loads it
    return model


def _declared(models: list[ServedModel], domains: list[str]) -> list[Domain]:
    """Each domain as the first model that serves it declares it."""
    return [next(s for s in models if d in s.domains).domain(d) for d in domains]


def _new_run(cfg: MergeConfig, out, tokenizer, domains: list[Domain]) -> Run:
    run = Run(cfg, out=out)  # never over an earlier run
    run.folder.save(tokenizer.save_pretrained)
    save_specs(run.folder.path, domains)
    return run


def _finish(run: Run, model, cfg: MergeConfig, card: ModelCard, kind: str, domain_data: dict, n: int) -> RunFolder:
    """The model in its format, the card and the run record (the config, versions, every domain's data for
    later stages)."""
    folder = run.folder
    spec = {**dataclasses.asdict(cfg), "models": [{**dataclasses.asdict(m), "model": folder.portable(m.model)}
                                                  for m in cfg.models], "base": folder.portable(cfg.base)}
    run.begin(run.new_record("merge", cfg.parameters.seed, domain_data, spec=spec, card=card.to_json(), output=kind))
    run.finish(model, format_of(card), card, None, lambda: {})
    log(f"merge: {cfg.method} of {n} models ({kind}) → {folder.path} (serves {', '.join(card.domains)})")
    return folder


def _arrow_folder(served, cfg, adapters, names, domains, plain, experts, domain_data, out) -> RunFolder:
    """The adapters kept apart in one folder, routed per token by PEFT's Arrow (formats/arrow.py)."""
    import shutil


    if not all(adapters):
        raise UserError(f"arrow routes among LoRA adapters; {', '.join(n for n, a in zip(names, adapters) if not a)} "
                        "are full models")
    base = shared_base(served)
    run = _new_run(cfg, out, served[0].tokenizer, _declared(served, domains))
    folder = run.folder
    keys = [f"{i}-{d}" for i, d in enumerate(experts)]
    for key, s in zip(keys, served):
        (folder.path / EXPERTS / key).mkdir(parents=True, exist_ok=True)
        with files_into(folder.path / EXPERTS / key) as tmp:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(s.path / name, Path(tmp) / name)
    card = ModelCard(domains=domains, plain=plain, format=Arrow.name, method="merge", preset=served[0].card.preset,
                     options={"top_k": cfg.parameters.top_k, "router_temperature": cfg.parameters.router_temperature},
                     base=folder.portable(base), details={"experts": keys, "merged": {"method": "arrow", "experts": experts},
                                                          **base_reference(served[0].card)})
    use = adapter_use(served, domains, plain)
    if not all(use.values()):  # a card-less checkpoint's own domain: routed to no adapter (cards before: none)
        card.details["adapter"] = use
    return _finish(run, None, cfg, card, "routed adapters", domain_data, len(served))
