"""Domains are data: a YAML spec per domain says where its records live, how a record becomes text, how
its output is checked and how a request becomes a generation prompt.

A training document is `<|bos|><|domain|>text<|eos|>`; asking for a domain means starting generation
from `<|bos|><|domain|>` plus a prompt (docs/DESIGN.md, "Pipeline and layout"). The built-in specs
(`stories.yaml`, `recipes.yaml`, `code.yaml` beside this file) are read at import; a user's own spec is
named by its path wherever a command takes a domain (`--domain poems.yaml`), and a model folder keeps
the specs of the domains it serves (`domains.yaml`), so `generate` and `serve` know them by name
afterwards.

    name: poems
    description: short poems
    data: {train: poems.jsonl, valid: poems.valid.jsonl}   # paths relative to the spec file
    text: {field: poem}                                    # or {template: "...{title}...", fields: {title: str}}
    check: {pattern: "(?:[^\\n]+\\n)+[^\\n]+"}             # optional: a named check or a regex for the whole text
    request: {nouns: [poem], prompt: "{topic:title}"}
"""
from __future__ import annotations

import dataclasses
import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Callable, Literal

import re2
import yaml

from ..config import arg, build, config, load_yaml
from ..errors import UserError, unknown
from .checks import CHECKS

Record = dict
HERE = Path(__file__).parent
SPECS_FILE = "domains.yaml"  # in a model folder: the specs of its domains that are not built in


# -- the spec: what a user writes -------------------------------------------------------------------
@config
class DataSpec:
    train: str | None = arg(None, "training file: a path relative to the spec (built-ins: to the data folder)")
    valid: str | None = arg(None, "validation file (none: hold out 1% of the training file)")
    hub: str | None = arg(None, "a Hugging Face dataset id, for users online")
    hub_val_split: str | None = arg(None, "the hub dataset's validation split (none: hold out 1%)")


@config
class TextSpec:
    field: str | None = arg(None, "the record's field that is the text (documents whose text is empty are skipped)")
    template: str | None = arg(None, "the text as a template over the record's fields: {name}, {items:bullets} "
                               "('- ' lines), {items:numbered} ('1. ' lines), {items:lines}")
    fields: dict[str, Literal["str", "list"]] = arg(help="the template's fields and their types; each must be "
                                                    "present and non-empty", factory=dict)
    prerendered: list[str] = arg(help="fields taken as the finished text when a record has none of `fields`",
                                 factory=list)

    def __post_init__(self):
        if (self.field is None) == (self.template is None):
            raise ValueError("'text' needs exactly one of 'field' or 'template'")
        if self.template is not None:
            used = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
            if used - set(self.fields):
                raise ValueError(f"'text.template' uses {sorted(used - set(self.fields))}, not declared in 'text.fields'")


@config
class RequestSpec:
    nouns: list[str] = arg(help="what the genre is called ('recipe'): cut from a request's topic", factory=list)
    prompt: str = arg("{topic}", "the generation prompt made of a request's topic: {topic}, {topic:title}, "
                      "{topic:identifier}")
    strip: str | None = arg(None, "a regex cut from the start of the topic (an opening the prompt already has)")
    verbatim: str | None = arg(None, "a regex: a request that matches it is the prompt as it is (a signature)")


@config
class DomainSpec:
    name: str = arg(help="the domain's name; its tag token is <|name|>")
    description: str = arg("", "one line saying what the text is")
    data: DataSpec = arg(help="where the records live", factory=DataSpec)
    text: TextSpec = arg(help="how a record becomes its training text", factory=lambda: TextSpec(field="text"))
    check: str | dict | None = arg(None, f"a structural check of a finished sample: one of {', '.join(CHECKS)}, "
                                   "or {pattern: REGEX} that the whole text must match")
    request: RequestSpec = arg(help="how a request becomes a generation prompt", factory=RequestSpec)
    demo_request: str = arg("", "a free-text request the demo routes and answers")

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", self.name):
            raise ValueError(f"'name': expected lower-case letters, digits, '_' or '-', got {self.name!r}")
        if isinstance(self.check, str) and self.check not in CHECKS:
            raise ValueError(f"'check': unknown check {self.check!r} (known: {', '.join(CHECKS)}, or {{pattern: REGEX}})")
        if isinstance(self.check, dict) and (set(self.check) != {"pattern"} or not isinstance(self.check["pattern"], str)):
            raise ValueError(f"'check': expected a check name or {{pattern: REGEX}}, got {self.check!r}")
        for key, rx in (("check.pattern", (self.check or {}).get("pattern") if isinstance(self.check, dict) else None),
                        ("request.strip", self.request.strip), ("request.verbatim", self.request.verbatim)):
            if rx is not None:
                try:
                    user_regex(rx)
                except re2.error as e:
                    why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
                    raise ValueError(f"'{key}': not a valid regex for RE2, the linear-time engine that runs a "
                                     f"spec's patterns (no backreferences or lookaround): {why}") from None


@functools.lru_cache(maxsize=256)
def user_regex(pattern: str, ignore_case: bool = False):
    """A pattern of a user's spec, compiled for RE2: a request or a sample can make a backtracking
    engine take exponential time (`(a+)+$` on 128 bytes froze the server for 110 s); RE2 takes time
    linear in the text, and refuses (`re2.error`) what it cannot run so: backreferences, lookaround.
    Unlike `re`, its \\s, \\w and \\b are ASCII."""
    options = re2.Options()
    options.log_errors = False  # the error is raised, and said once by whoever reads the spec
    options.case_sensitive = not ignore_case
    return re2.compile(pattern, options)


# -- templates --------------------------------------------------------------------------------------
_SMALL = {"a", "an", "and", "as", "at", "but", "by", "for", "from", "in", "into", "of", "on", "or",
          "the", "to", "with"}


def _title(text: str) -> str:
    """"a banana bread" -> "Banana Bread": a title as the corpora write them (small words stay lower case
    inside it: "Chicken with Rice")."""
    words = re.sub(r"^(?:a|an|some)\s+", "", text, flags=re.IGNORECASE).split()
    return " ".join(w if i and w.lower() in _SMALL else w[:1].upper() + w[1:] for i, w in enumerate(words))


def _identifier(text: str) -> str:
    """"flattens a nested list" -> "flatten_nested_list": a name in snake case, articles dropped, a leading
    third-person verb made imperative (functions are named "flatten", not "flattens")."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ("a", "an", "the")]
    if words and len(words[0]) > 3 and words[0].endswith("s") and not words[0].endswith("ss"):
        words[0] = words[0][:-1]
    return "_".join(words)


class _Template(string.Formatter):
    """str.format with a few format specs that lay out text: ours because the layouts are a handful and
    a template engine would be a dependency for five lines."""
    SPECS = {
        "bullets": lambda items: "\n".join(f"- {x}" for x in items),
        "numbered": lambda items: "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1)),
        "lines": lambda items: "\n".join(items),
        "title": _title,
        "identifier": _identifier,
    }

    def format_field(self, value, spec):
        if spec in self.SPECS:
            return self.SPECS[spec](value)
        return super().format_field(value, spec)


TEMPLATE = _Template()


# -- the domain: what the rest of expandlm uses -----------------------------------------------------
@dataclass(frozen=True)
class Domain:
    spec: DomainSpec    # a user's spec has its data paths made absolute when it is read
    builtin: bool = False
    # requested with no tag: a pretrained model's own behaviour (a card's `plain` domains), whose text
    # starts as its own tokenizer starts a text (`data/tokenizer.py`, `request_prefix`)
    plain: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def tag(self) -> str:
        return f"<|{self.name}|>"

    @property
    def nouns(self) -> tuple[str, ...]:
        return tuple(self.spec.request.nouns)

    @property
    def demo_request(self) -> str:
        return self.spec.demo_request

    # where the data lives
    @property
    def hub_id(self) -> str | None:
        return self.spec.data.hub

    @property
    def hub_val_split(self) -> str | None:
        return self.spec.data.hub_val_split

    def data_file(self, which: Literal["train", "valid"], data_dir: Path | None = None) -> Path | None:
        """The domain's training or validation file: built-ins under the data folder, a user's spec
        relative to the spec file."""
        name = getattr(self.spec.data, which)
        if name is None or self.builtin and data_dir is None:
            return None
        return data_dir / name if self.builtin else Path(name)

    def local_files(self, data_dir: Path | None) -> tuple[str, str | None]:
        """(training file, validation file or None) on this machine; an error says where it looked."""
        train = self.data_file("train", data_dir)
        if train is None or not train.exists():
            where = "no 'data.train' in its spec" if train is None else f"looked for {train}"
            raise UserError(f"corpus for domain '{self.name}' not found ({where}); pass a data folder "
                            "($EXPANDLM_DATA, --data-dir or data_dir in a study config), or --hub when online")
        valid = self.data_file("valid", data_dir)
        return str(train), str(valid) if valid is not None else None

    # record -> text
    def render(self, record: Record, loc: str) -> str:
        """The record's training text; a missing or ill-typed field stops with its location and name."""
        text = self.spec.text
        if text.field is not None:
            return field(record, text.field, str, loc).strip()
        if not any(f in record for f in text.fields):
            for name in text.prerendered:
                if isinstance(record.get(name), str):
                    return record[name].strip()
        values = {}
        for name, kind in text.fields.items():
            if kind == "str":
                values[name] = field(record, name, str, loc).strip()
                if not values[name]:
                    raise UserError(f"{loc}: field '{name}' is empty")
            else:
                values[name] = string_list(record, name, loc)
                if not values[name]:
                    raise UserError(f"{loc}: field '{name}' has no non-empty item")
        return TEMPLATE.format(text.template, **values).strip()

    # request -> prompt
    def prompt(self, topic: str) -> str:
        """A request's topic as the generation prompt after `<|bos|><|domain|>` ("" for no topic)."""
        r = self.spec.request
        if r.verbatim and user_regex(r.verbatim).match(topic):
            return topic.strip()
        if r.strip:
            topic = user_regex(r.strip, ignore_case=True).sub("", topic, count=1).strip()
        return TEMPLATE.format(r.prompt, topic=topic) if topic.strip() else ""

    # generated text -> structurally valid?
    @property
    def check(self) -> Callable[[str], bool] | None:
        c = self.spec.check
        if c is None:
            return None
        if isinstance(c, str):
            return CHECKS[c]
        pattern = user_regex(c["pattern"])  # no DOTALL: "." stays within a line, as in a line-based layout
        return lambda text: pattern.fullmatch(text.strip()) is not None

    def valid(self, text: str, finished: bool) -> bool:
        """A sample passes the structural check only if it also ended before the length limit."""
        check = self.check
        return bool(finished and check is not None and check(text))


def field(record: Record, name: str, kind: type, loc: str):
    """`record[name]`, checked to be a `kind`; the error names the location and the field."""
    if name not in record:
        raise UserError(f"{loc}: missing field '{name}' (expected {kind.__name__})")
    value = record[name]
    if not isinstance(value, kind):
        raise UserError(f"{loc}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def string_list(record: Record, name: str, loc: str) -> list[str]:
    items = field(record, name, list, loc)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise UserError(f"{loc}: field '{name}[{i}]' must be str, got {type(item).__name__}")
    return [s.strip() for s in items if s.strip()]


# -- the registry -----------------------------------------------------------------------------------
DOMAINS: dict[str, Domain] = {}
BUILTIN = ("stories", "recipes", "code")  # in this order: the paper's two, then the third


def register_domain(domain: Domain) -> Domain:
    """Make a domain known by name. The same name declared twice must mean the same spec."""
    known = DOMAINS.get(domain.name)
    if known is not None and known.spec != domain.spec:
        if known.builtin:
            raise UserError(f"domain '{domain.name}' is built in; give your own domain another name")
        raise UserError(f"two different specs declare domain '{domain.name}'; give one of them another name")
    DOMAINS.setdefault(domain.name, domain)
    return DOMAINS[domain.name]


def load_spec(path: str | Path, builtin: bool = False) -> Domain:
    """A domain from its YAML spec file, registered; a bad spec names the file and the key."""
    path = Path(path)
    spec = build(DomainSpec, load_yaml(path), str(path))
    if not builtin:  # the data paths of a user's spec start at the spec's folder
        for key in ("train", "valid"):
            value = getattr(spec.data, key)
            if value is not None:
                setattr(spec.data, key, str((path.resolve().parent / value).resolve()))
    return register_domain(Domain(spec, builtin))



def is_spec_path(name: str) -> bool:
    return str(name).endswith((".yaml", ".yml"))


def get_domain(name: str, known: Mapping[str, Domain] | None = None) -> Domain:
    """A domain by name (among `known`, a model folder's own domains, first), or by the path of its spec
    file (which registers it: the user named it)."""
    if is_spec_path(name):
        return load_spec(name)
    if known and name in known:
        return known[name]
    try:
        return DOMAINS[name]
    except KeyError:
        names = sorted({*DOMAINS, *(known or {})})
        raise unknown("domain", name, names, "; or give the path of a domain spec file, e.g. poems.yaml") from None


def plain_domain(name: str, known: Mapping[str, Domain] | None = None) -> Domain:
    """A pretrained model's own behaviour as a domain called `name` (`--base-domain`), requested with no
    tag. A name that is already a domain (`stories`, a spec file) keeps its spec, so its data, text and
    check still apply; any other name reads the `text` field of a record."""
    if is_spec_path(name) or name in (known or {}) or name in DOMAINS:
        return dataclasses.replace(get_domain(name, known), plain=True)
    try:
        spec = DomainSpec(name=name, description="the model's own behaviour (a pretrained checkpoint)")
    except ValueError as e:
        raise UserError(f"--base-domain {name!r}: {e}") from None
    return Domain(spec, plain=True)


def builtin_tags() -> list[str]:
    """The tags every tokenizer reserves, so one tokenizer can serve each built-in domain."""
    return [DOMAINS[n].tag for n in BUILTIN]


# -- a model folder's own domains -------------------------------------------------------------------
def save_specs(folder: Path, domains: list[Domain]) -> None:
    """Write the specs of `domains` that are not built in to `folder/domains.yaml` (their data paths are
    absolute, so the folder does not depend on where the spec file was)."""
    from ..atomic import write_text
    from ..process import is_main_process

    specs = [dataclasses.asdict(d.spec) for d in domains if not d.builtin]
    if specs and is_main_process():
        write_text(folder / SPECS_FILE, yaml.safe_dump({"domains": specs}, sort_keys=False, allow_unicode=True))


def folder_domains(folder: Path) -> dict[str, Domain]:
    """The user's domains a model folder declares (see `save_specs`), by name. Reading them registers
    nothing: two folders may each declare their own domain of one name."""
    path = Path(folder) / SPECS_FILE
    if not path.exists():
        return {}
    entries = load_yaml(path).get("domains")
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected 'domains:' with a list of domain specs")
    out = {}
    for i, entry in enumerate(entries):
        domain = Domain(build(DomainSpec, entry, f"{path}: domains[{i}]"))
        if domain.name in DOMAINS and DOMAINS[domain.name].builtin:
            raise UserError(f"{path}: domains[{i}]: '{domain.name}' is a built-in domain's name")
        out[domain.name] = domain
    return out


for _name in BUILTIN:
    load_spec(HERE / f"{_name}.yaml", builtin=True)
