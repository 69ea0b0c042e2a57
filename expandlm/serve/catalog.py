"""What `expandlm serve` serves: every domain of every model folder is a model id (`Endpoint`), named
`MODEL/DOMAIN`, or by the bare domain name where one model serves it, plus `auto`, which routes a request
with `expandlm.routing` and says which domain answered (`Catalog`).

    catalog = Catalog([load_served("runs/demo/+recipes")])
    endpoint = catalog.get("stories")
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import UserError
from ..formats.served import ServedModel
from ..routing import router as routing
from ..routing.router import Route, load_router, route_request
from .protocol import APIError

AUTO = "auto"


@dataclass
class Endpoint:
    """One served domain of one model: what a model id names."""
    id: str
    served: ServedModel
    domain: str

    @functools.cached_property  # looked up once: the decode loop asks for it every token
    def tokenizer(self):
        return self.served.tokenizer_for(self.domain)

    @functools.cached_property
    def context(self) -> int:
        return self.served.for_domain(self.domain).config.max_position_embeddings

    @functools.cached_property
    def vocab_size(self) -> int:
        """The rows of its embedding: the token ids a prompt may hold."""
        return self.served.for_domain(self.domain).config.vocab_size

    @functools.cached_property
    def chat_template(self) -> bool:
        """Chat uses the tokenizer's own template: a plain domain (a pretrained checkpoint's own
        behaviour) whose tokenizer has one, as an instruct model's has. expandlm's domains have none."""
        return self.domain in self.served.card.plain and bool(getattr(self.tokenizer, "chat_template", None))

    @functools.cached_property
    def end_of_turn(self) -> frozenset[int]:
        """The tokens that end an assistant's turn besides the tokenizer's EOS: the generation config's
        `eos_token_id`, one id or a list (Qwen's <|im_end|> and <|endoftext|>), as vLLM stops on them."""
        config = getattr(self.served.for_domain(self.domain), "generation_config", None)
        ids = getattr(config, "eos_token_id", None)
        return frozenset([ids] if isinstance(ids, int) else ids or [])


class Catalog:
    """Every domain of every model folder, by model id."""

    def __init__(self, models: list[ServedModel], names: list[str] | None = None):
        """`names`: what each folder is called in model ids (vLLM's --served-model-name); default its folder's name."""
        if not models:
            raise UserError("serve needs at least one model folder")
        if names and len(names) != len(models):
            raise UserError(f"--served-model-name: {len(names)} name(s) for {len(models)} model folder(s); "
                            "give one a folder")
        if names and (bad := [n for n in names if not n or "/" in n or n == AUTO]):
            raise UserError(f"--served-model-name {bad[0]!r}: a name is one word without '/', and not '{AUTO}'")
        self.models = models
        names = list(names or [m.path.name for m in models])
        self.endpoints: dict[str, Endpoint] = {}
        for i, served in enumerate(models):
            name = names[i] if names.count(names[i]) == 1 else f"{names[i]}-{i}"
            for domain in served.domains or []:
                self.endpoints[f"{name}/{domain}"] = Endpoint(f"{name}/{domain}", served, domain)
        if not self.endpoints:
            raise UserError(f"{models[0].path}: no expandlm.json saying which domains it serves")
        self.aliases = {}  # a bare domain name, where exactly one model serves it
        for endpoint in self.endpoints.values():
            self.aliases.setdefault(endpoint.domain, []).append(endpoint)
        self.aliases = {d: eps[0] for d, eps in self.aliases.items() if len(eps) == 1 and d != AUTO}
        self.router = self._router()  # loaded (or trained) once, not per request

    def ids(self) -> list[str]:
        return [*self.endpoints, *(a for a in self.aliases if a not in self.endpoints), AUTO]

    def find(self, model_id: str) -> Endpoint | None:
        return self.endpoints.get(model_id) or self.aliases.get(model_id)

    def get(self, model_id: str) -> Endpoint:
        endpoint = self.find(model_id)
        if endpoint is None:
            raise APIError(404, f"The model '{model_id}' does not exist; served: {', '.join(self.ids())}",
                           param="model", code="model_not_found")
        return endpoint

    def _router(self):
        """The first model's own router when it serves every domain served here; else one router over
        the union of the folders' domains, trained at start from each domain's recorded training data
        (the first folder that serves a domain answers it)."""
        domains = list(dict.fromkeys(e.domain for e in self.endpoints.values()))
        if set(domains) <= set(self.models[0].domains):
            return load_router(self.models[0])
        data, declared = {}, {}
        for served in self.models:
            known = served.domain_data()
            for d in served.domains:
                if d not in data and d in known:
                    data[d] = known[d]
                    declared[d] = served.domain(d)
        missing = [d for d in domains if d not in data]
        if missing:
            raise UserError(f"cannot route 'auto' over {', '.join(domains)}: no recorded training data for "
                            f"{', '.join(missing)} (run.json 'domain_data')")
        return routing.router_from_data(data, known=declared)

    def route(self, request: str) -> tuple[Endpoint, Route]:
        """`auto`: the router picks the domain; the first model that serves it answers."""
        try:
            routed = (routing.route(request, self.router) if self.router
                      else route_request(request, self.models[0]))
        except UserError as e:
            raise APIError(400, str(e), param="prompt") from None
        endpoint = next(e for e in self.endpoints.values() if e.domain == routed.domain)
        return endpoint, routed
