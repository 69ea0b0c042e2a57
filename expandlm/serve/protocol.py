"""The OpenAI API's shapes as `expandlm serve` reads and answers them: the request models (pydantic,
strict: "5" is not 5; OpenAI's fields plus vLLM's `top_k` and `ignore_eos`) and the error every failure
is answered with, {"error": {"message", "type", "param", "code"}}, as vLLM's `entrypoints/openai/protocol.py`
holds them.

    req = CompletionRequest.model_validate({"model": "stories", "prompt": "Once"})
    raise APIError(404, "The model 'poems' does not exist", param="model", code="model_not_found")
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's and vLLM's bounds
MAX_LOGPROBS = 20  # alternatives a token may report (OpenAI's top_logprobs bound, vLLM's default max_logprobs)
MAX_PROMPTS = 16   # prompts in one completion request (each of its n choices a sequence of the queue)
INT64 = (-2**63, 2**63 - 1)  # the seeds vLLM accepts; seed + i (n <= 16) stays within torch's range


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def _unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"), which no tokenizer (nor a UTF-8 response) takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                         f"{e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class Sampling(BaseModel):
    """The sampling fields of both endpoints (OpenAI's, plus vLLM's top_k). Strict types: "5" is not 5."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int | None = None  # vLLM's extension; None, 0 or -1: off
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever (for load tests)
    stop: Text | list[Text] | None = Field(None, validate_default=True)  # read as a list (`_stops`)
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return [s for s in stops if s]  # "" stops nothing, as in a list (else every answer would be empty)

    def alternatives(self) -> int | None:
        """None: no logprobs asked; k: each token's log probability with its k likeliest alternatives."""
        return None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Sampling):
    """A prompt is text, token ids, or a list of either (each its own choices, `index` p·n + i), as
    OpenAI's /v1/completions takes it; `logprobs` k: each token's log probability and its k likeliest
    alternatives (0: the chosen token's only)."""
    prompt: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]) = ""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, prompt, handler):
        """One message for the four shapes, instead of a complaint from each (pydantic tries them all)."""
        try:
            return handler(prompt)
        except ValidationError as e:
            ours = [err["msg"].removeprefix("Value error, ") for err in e.errors() if err["type"] == "value_error"]
            if ours:  # a text's own fault (a lone surrogate)
                raise ValueError(ours[0]) from None
            if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, not {len(prompt)}") from None
            raise ValueError("expected a string, a list of strings, a list of token ids (integers, 0 or more), "
                             f"or a list of such lists; none empty, at most {MAX_PROMPTS} prompts") from None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def alternatives(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read, and their `text` is a string."""
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: Text | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text', a string")
        return self


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: their text parts
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(Sampling):
    """`logprobs` true: each token's log probability; `top_logprobs` k: with its k likeliest alternatives."""
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info: ValidationInfo):
        if top and not info.data.get("logprobs"):  # as OpenAI answers it
            raise ValueError("top_logprobs needs logprobs set to true")
        return top

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def logprobs_object(entries: list, tokenizer, chat: bool, offset: int) -> tuple[dict, int]:
    """OpenAI's logprobs of `entries` (`scheduler.TokenLogprob`s, the raw model distribution's, as vLLM
    reports them by default), and the text offset after them. Chat: {"content": [{token, logprob, bytes,
    top_logprobs: [...]}]}; completions (the legacy shape): {tokens, token_logprobs, top_logprobs (a dict per
    token: its alternatives and the chosen token), text_offset}."""
    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id])

    if chat:
        def item(token_id: int, lp: float) -> dict:
            return {"token": piece(token_id), "logprob": lp, "bytes": list(piece(token_id).encode())}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}, offset
    tokens, offsets = [], []
    for e in entries:
        tokens.append(piece(e.token))
        offsets.append(offset)
        offset += len(tokens[-1])
    tops = [{**{piece(t): lp for t, lp in e.top}, tokens[i]: e.logprob} for i, e in enumerate(entries)]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}, offset


def _is_tag(part) -> bool:
    """A part of a pydantic error's location that names a member of a union ("function-after[_unicode(),
    str]", "list[...]", "str", "ContentPart"), not a field of the request."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")
                                      or part[:1].isupper())


def readable_problems(errors: list[dict]) -> list[tuple[str, str]]:
    """pydantic's errors as (field, message) in the request's own terms: `prompt`, not
    `prompt.function-after[_unicode(), str]`. A field of several accepted types (a string or a list) gets
    one message: the list's where a list was sent, else what each type expects."""
    def field(e: dict, whole: bool = True) -> str:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        if not whole:  # up to the union: its members' errors are about one field
            loc = loc[:next((i for i, p in enumerate(loc) if _is_tag(p)), len(loc))]
        return ".".join(str(p) for p in loc if not _is_tag(p))

    by_field: dict[str, list[dict]] = {}
    for e in errors:
        by_field.setdefault(field(e, whole=False), []).append(e)
    problems = []
    for found in by_field.values():
        if len(found) > 1 and isinstance(found[0].get("input"), list):  # a list was sent: the list's complaint
            found = [e for e in found if any(isinstance(p, str) and p.startswith("list[") for p in e["loc"])] or found
        messages = list(dict.fromkeys(e.get("msg", "").removeprefix("Value error, ") for e in found))
        if len(messages) > 1 and all(m.startswith("Input should be ") for m in messages):
            messages = ["Input should be " + " or ".join(m.removeprefix("Input should be ") for m in messages)]
        problems.append((field(found[0]), "; ".join(messages)))
    return problems
