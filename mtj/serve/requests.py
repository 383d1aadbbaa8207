"""The request models of the HTTP API (SPEC §6) and their validation: every field's type, finite numbers,
ranges, unknown fields refused, duplicate keys and lone surrogates refused, before anything is tokenized."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator

from mtj.chat import ROLES
from mtj.decode.sampling import SEED_LIMIT
from mtj.evaluate import TOP_LOGPROBS

MAX_LOGPROBS = TOP_LOGPROBS


class BadRequest(ValueError):
    """A client error: answered with `status` and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both OpenAI endpoints share (SPEC §6); any other field is refused."""

    model: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    temperature: FiniteFloat = Field(1.0, ge=0, le=2)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: off
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted as OpenAI accepts it: an end-user id, no effect on the output
    # logit adjustments (mtj.decode.penalties; the values' ranges are checked with the job's)
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    repetition_penalty: FiniteFloat = 1.0  # vLLM's extension (transformers' definition)
    logit_bias: dict[str, FiniteFloat] | None = Field(None, max_length=1024)  # token id (as a string): bias

    @model_validator(mode="after")
    def _token_ids(self) -> "Sampling":
        if any(not re.fullmatch(r"\d{1,9}", token) for token in self.logit_bias or {}):
            raise ValueError("'logit_bias' keys must be token ids (whole numbers as strings)")
        return self

    def adjustments(self) -> dict[str, Any]:
        """The jobs' logit adjustments (Admission.jobs_for's keywords)."""
        return dict(repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty,
                    logit_bias={int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])  # ("" stops nothing: RowText)

    def check(self) -> None:
        """The checks across fields."""
        if self.seed is not None and self.seed + self.n > SEED_LIMIT:
            raise BadRequest("'seed' + n must be below 2^32")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("'stream_options' needs 'stream': true")


class CompletionRequest(Sampling):
    """OpenAI's /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None  # accepted equal to n (clients send it so), refused otherwise

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, union: Callable[[Any], Any]) -> Any:
        """A list of one item type is taken as it is; the union's members are tried item by item, and a failed
        member collects an error per item (0.15 s on the event loop for 600,000 strings), so only other input
        (and every error) goes through it."""
        if isinstance(value, list) and value:
            kinds = set(map(type, value))
            if kinds == {str} or kinds == {int} or kinds == {list} and all(set(map(type, v)) <= {int} for v in value):
                return value
        return union(value)

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("'best_of' other than n is not implemented by mtj")
        return self


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    """A message as chat templates read it: role and text (a list of text parts is joined by newlines)."""

    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        content = "\n".join(p.text for p in self.content) if isinstance(self.content, list) else self.content
        return {"role": self.role, "content": content, **({"name": self.name} if self.name is not None else {})}


class Chat(Strict):
    """A conversation to render: vLLM's fields beside OpenAI's messages."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True  # vLLM's extension: end with the assistant's turn opening

    def for_template(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]


class ChatRequest(Sampling, Chat):
    """OpenAI's /v1/chat/completions. max_tokens None: up to 256 tokens, as many as fit the context."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def new_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise BadRequest("give 'max_tokens' or 'max_completion_tokens', not both")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(Strict):
    """vLLM's /tokenize for a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # (the GPT-J/Neo/NeoX tokenizers add none: the ids of a completion's prompt)
    return_token_strs: bool = False


class TokenizeChatRequest(Chat):
    """vLLM's /tokenize for messages: the ids of the prompt a chat completion of them reads."""

    model: str | None = None
    add_special_tokens: bool = False  # vLLM's default for messages: the template writes them
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    """vLLM's /detokenize."""

    model: str | None = None
    tokens: list[int]


class CompleteRequest(Strict):
    """The original mtj /complete request."""

    context: str
    top_p: FiniteFloat = Field(0.9, gt=0, le=1)
    temp: FiniteFloat = Field(1.0, ge=0, le=2)
    length: int | None = Field(None, ge=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)  # None: a random one, as /v1/completions


def check_model(model: str | None, served: str) -> None:
    """404 for a request naming a model other than the one served."""
    if model is not None and model != served:
        raise BadRequest(f"the model '{shown(model)}' is not served here; this server serves '{served}'", 404)


def _describe(error: ValidationError) -> str:
    """The problems, by field, without echoing the values (which may be huge)."""
    parts = []
    for e in error.errors(include_input=False, include_url=False):
        where = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("list[", "str", "int")))
        if e["type"] == "extra_forbidden":
            parts.append(f"'{where}' is not implemented by mtj")
        elif not where:  # a check of the whole request: its message names the fields
            parts.append(str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"])
        else:
            parts.append(f"'{where}': {e['msg']}")
    return "; ".join(dict.fromkeys(parts))


def _not_a_number(constant: str) -> None:
    raise ValueError(f"{constant} is not a number")


def shown(text: str) -> str:
    """A client's string as an error message may quote it: short, and always encodable."""
    return text[:100].encode("utf-8", "replace").decode()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key '{shown(key)}' appears twice")
    return out


def _text_object(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are unique and whose strings are text: no lone surrogates (JSON's
    \\ud800 escapes make them; no tokenizer takes them). Strings are the fields' values or the items
    of a list (prompt, stop); deeper ones fail the request models' types anyway."""
    for key, value in pairs:
        texts = [key] + ([value] if isinstance(value, str) else
                         [v for v in value if isinstance(v, str)] if isinstance(value, list) else [])
        for text in texts:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError(f"'{shown(key)}' holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    return _unique_keys(pairs)


# Only a \\u escape can make a surrogate (UTF-8 bytes cannot): a body without one skips the per-string check,
# which cost 40 ms of the event loop for a 600,000-string prompt list.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse(model: type[BaseModel] | Callable[[dict], type[BaseModel]], body: bytes) -> Any:
    """The request model of a body (`model`, or the one `model(data)` picks for the decoded JSON object); 400 for
    anything that is not one."""
    try:
        data = json.loads(body, parse_constant=_not_a_number,
                          object_pairs_hook=_text_object if SURROGATE_ESCAPE.search(body) else _unique_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    if not isinstance(model, type):
        model = model(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(_describe(e)) from None

