"""Test doubles for the test suite and the benches; no stage imports this package.

* `server`  `TestLLMServer`: a local OpenAI-compatible (and Gemini/Anthropic batch-shaped) LLM server that
            misbehaves on purpose (latency, 429s, 5xx, hangs, drops). Run it by hand with
            ``python -m llamaduo_nb.testing --rpm 600 --latency 0.5``.
"""

from .server import (
    OUTCOMES,
    Behaviour,
    LoggedRequest,
    TestLLMServer,
    counted_tokens,
    reply_text,
    request_key,
    schema_instance,
)

__all__ = [
    "OUTCOMES",
    "Behaviour",
    "LoggedRequest",
    "TestLLMServer",
    "counted_tokens",
    "reply_text",
    "request_key",
    "schema_instance",
]
