"""The OpenAI HTTP protocol: request models, response and SSE chunk builders, error bodies.

Conventions follow vLLM's OpenAI server (REFERENCES.md "Serving"): ``max_tokens`` defaults to 16
for completions; ``logprobs`` is an int ≤ 20 for completions (the top alternatives per token) and a
bool + ``top_logprobs`` for chat; ``echo`` prepends the prompt (and its log-probs, the first one
``null``) — what lm-eval's ``local-completions`` model uses to score log-likelihoods. Unknown
fields are ignored (clients send optional ones we do not implement), but every known field is
type- and range-checked: a bad value is a 400 with an OpenAI error body naming the field.
Streams are ``data: {json}`` lines ending with ``data: [DONE]``; a usage chunk with empty
``choices`` comes last when ``stream_options.include_usage`` is set; a chat stream's first delta of
each choice carries the role.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The engine's bound (models.serving.engine.MAX_LOGPROBS, a test keeps them equal), repeated so that the
# gateway process does not import torch.
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in v if s]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def parse_request(cls: type[BaseModel], body: bytes) -> Any:
    """Body bytes -> request model, or APIError(400) naming the first bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps (ensure_ascii) writes for a str


class SSEChunks:
    """``sse({**envelope, "choices": [choice]})`` for many chunks of one stream, serializing only the choice.

    The envelope (id, object, created, model) is the same for every chunk of a stream; it is
    serialized once, and each chunk is that text around ``json.dumps(choice)`` (the same bytes
    ``sse`` writes). ``text`` and ``content`` build the common chunk of each kind, a text delta, from a
    template that only encodes the text (``json.dumps`` escapes a string with ``encode_basestring_ascii``:
    the same function, so the same bytes; a test compares them).
    """

    def __init__(self, envelope: dict) -> None:
        self.head, self.tail = sse({**envelope, "choices": ["\0"]}).split('"\\u0000"')

    def __call__(self, choice: dict) -> str:
        return self.head + json.dumps(choice, separators=(",", ":")) + self.tail

    def text(self, index: int, text: str, finish_reason: str | None = None) -> str:
        """A completions chunk without logprobs."""
        reason = "null" if finish_reason is None else _encode_str(finish_reason)
        return (f'{self.head}{{"index":{index:d},"text":{_encode_str(text)},"logprobs":null,'
                f'"finish_reason":{reason}}}{self.tail}')

    def content(self, index: int, text: str) -> str:
        """A chat chunk whose delta is ``{"content": text}``, without logprobs or finish."""
        return (f'{self.head}{{"index":{index:d},"delta":{{"content":{_encode_str(text)}}},"logprobs":null,'
                f'"finish_reason":null}}{self.tail}')


# ---------------------------------------------------------------------- completions logprobs
class CompletionLogprobs:
    """Accumulates the legacy completions ``logprobs`` object (tokens, token_logprobs, top, offsets)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []
        self._offset = 0

    def add(self, token: str, logprob: float | None, top: list | None) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {t: lp for t, lp in top})
        self.text_offset.append(self._offset)
        self._offset += len(token)

    def add_all(self, tokens: list[str], logprobs: list, tops: list) -> None:
        for token, logprob, top in zip(tokens, logprobs, tops):
            self.add(token, logprob, top)

    def add_prompt(self, entries: list[dict]) -> None:
        for e in entries:
            self.add(e["token"], e["logprob"], e["top"])

    def take(self) -> dict:
        """The part accumulated since the last take (a stream sends pieces)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def chat_logprob_entry(token: str, logprob: float, top: list | None) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in (top or [])]}
