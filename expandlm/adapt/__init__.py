"""Training methods that make a trained model serve a new domain too (`expandlm adapt`): one file per
method (see `method.py`), each naming the folder format it produces (`formats/`)."""
from ..config import build
from ..errors import UserError, unknown
from .ewc import EWC
from .expand import Expand
from .expand_branch import ExpandBranch
from .expand_paths import ExpandPaths
from .full_ft import FullFineTune
from .joint import Joint
from .lora import LoRA
from .method import AdaptContext, Adapted, Method
from .replay import Replay

METHODS: dict[str, type[Method]] = {m.name: m for m in (ExpandBranch, ExpandPaths, Expand, LoRA, Replay, EWC, Joint,
                                                        FullFineTune)}
DEFAULT_METHOD = "expand_branch"  # `adapt`'s default; why: docs/RESULTS.md, "The expansion recipe"


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        hint = " (arrow routes adapters that are already trained: make it with `expandlm merge`)" if name == "arrow" else ""
        raise UserError(f"{unknown('method', name, METHODS)}{hint}")
    return METHODS[name]


def make_method(name: str, options: dict | None = None, where: str | None = None) -> Method:
    """A method by name with its options validated (an unknown option or a bad value names the option
    and what was expected)."""
    cls = method_class(name)
    return cls(build(cls.Options, options or {}, where or f"method '{name}' options"))


__all__ = ["METHODS", "DEFAULT_METHOD", "AdaptContext", "Adapted", "Method", "make_method", "method_class"]
