"""K completions from one request (`ChatRequest.n`): sent as OpenAI's `n`, K answers back, cached and replayed
together, usage counted once for the prompt and once per completion (llama-server's reply counted exactly)."""

from __future__ import annotations

import json

import pytest
from test_services import ScriptedLLMServer, ask, make_pool

from llamaduo_nb.callcache import read_ledger
from llamaduo_nb.services import Choice


@pytest.fixture
def llm_server():
    server = ScriptedLLMServer()
    yield server
    server.close()


def llama_server_reply(texts_and_reasons: list[tuple[str, str]], prompt: int, first_tokens: int) -> dict:
    """A reply shaped as llama-server's to n > 1: every choice, but the usage of the first one alone."""
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "test-model",
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": why}
                    for i, (text, why) in enumerate(texts_and_reasons)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": first_tokens,
                  "total_tokens": prompt + first_tokens},
        "timings": {"prompt_n": prompt, "predicted_n": first_tokens},
    }  # fmt: skip


def test_n_completions_come_from_one_request_are_counted_once_per_prompt_and_replay_together(
    tmp_path, llm_server
):
    choices = [("first answer", "stop"), ("second", "stop"), ("third, cut", "length")]
    llm_server.script = [
        (200, {}, llama_server_reply(choices, prompt=11, first_tokens=5)),
        (200, {}, {"tokens": [1, 2, 3]}),  # /tokenize of "second" (the cut one needs no count: max_tokens)
    ]
    pool, layout = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    request = ask("Say something.", n=3, temperature=0.7, max_tokens=16, allow_truncated=True)
    with pool:
        (result,) = pool.complete_many("judge", [request])
    sent = [r for r in llm_server.requests if r["path"].endswith("/chat/completions")]
    assert len(sent) == 1 and sent[0]["body"]["n"] == 3
    assert [r["path"] for r in llm_server.requests[1:]] == ["/tokenize"]
    assert result.error is None and not result.cached
    assert result.texts == ["first answer", "second", "third, cut"]
    # the first from the server's usage, the second its tokens + the stop token, the cut one max_tokens
    assert [c.output_tokens for c in result.choices] == [5, 4, 16]
    assert (result.input_tokens, result.output_tokens) == (11, 25)
    (row,) = read_ledger(layout.calls_db)
    assert (row["input_tokens"], row["output_tokens"]) == (11, 25)

    with pool:  # a re-run: the three answers replay from one cached call
        (again,) = pool.complete_many("judge", [request])
    assert again.cached and len(llm_server.requests) == 2
    assert again.choices == result.choices and again.text == "first answer"
    assert all(isinstance(c, Choice) for c in again.choices)
    assert (again.input_tokens, again.output_tokens) == (11, 25)


def test_n_is_part_of_the_key_only_when_above_one(tmp_path, llm_server):
    pool, _ = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    with pool:
        one = pool.cache_key("judge", ask())
        assert pool.cache_key("judge", ask(n=1)) == one
        assert pool.cache_key("judge", ask(n=2)) != one
        (result,) = pool.complete_many("judge", [ask()])
    assert "n" not in llm_server.requests[0]["body"]
    assert result.choices == [] and result.texts == [result.text]


def test_an_openai_reply_with_n_choices_splits_its_completion_tokens(tmp_path, llm_server):
    """OpenAI and vLLM report the completion tokens of all choices: each choice gets its share."""
    reply = llama_server_reply([("a", "stop"), ("b", "stop")], prompt=11, first_tokens=7)
    del reply["timings"]
    llm_server.script = [(200, {}, reply)]
    pool, _ = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    with pool:
        (result,) = pool.complete_many("judge", [ask(n=2)])
    assert [c.output_tokens for c in result.choices] == [4, 3] and result.output_tokens == 7
    assert json.loads(json.dumps(result.texts)) == ["a", "b"]
