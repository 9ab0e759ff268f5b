from __future__ import annotations

import subprocess
import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sentinel_proxy.identity import Identity, conversation_start

KEY = b"k" * 32
SYSTEM = {"role": "system", "content": "You are terse."}
FIRST = {"role": "user", "content": "What is 2+2?"}


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fast", "messages": list(messages)}


def test_a_growing_history_keeps_its_id() -> None:
    identity = Identity(KEY)
    first = identity.implicit_id(None, chat(SYSTEM, FIRST))
    later = identity.implicit_id(
        None,
        chat(
            SYSTEM,
            FIRST,
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ),
    )
    assert first is not None and first == later
    assert first.startswith("implicit-") and len(first) == len("implicit-") + 32


def test_other_starts_tenants_or_keys_give_other_ids() -> None:
    identity = Identity(KEY)
    base = identity.implicit_id(None, chat(SYSTEM, FIRST))
    others = {
        identity.implicit_id(None, chat(SYSTEM, {"role": "user", "content": "What is 2+3?"})),
        identity.implicit_id(None, chat({"role": "system", "content": "Be verbose."}, FIRST)),
        identity.implicit_id(None, chat(FIRST)),
        identity.implicit_id("team-a", chat(SYSTEM, FIRST)),
        Identity(b"j" * 32).implicit_id(None, chat(SYSTEM, FIRST)),
    }
    assert base not in others and len(others) == 5


def test_the_same_key_gives_the_same_id_in_another_process() -> None:
    code = (
        "from sentinel_proxy.identity import Identity;"
        "print(Identity(b'k' * 32).implicit_id('t', {'messages': "
        "[{'role': 'system', 'content': 'You are terse.'},"
        " {'role': 'user', 'content': 'What is 2+2?'}]}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == Identity(KEY).implicit_id("t", chat(SYSTEM, FIRST))


def test_no_user_message_no_implicit_id() -> None:
    assert Identity(KEY).implicit_id(None, chat(SYSTEM)) is None
    assert Identity(KEY).implicit_id(None, {"model": "fast"}) is None


def test_the_responses_api_is_read_by_instructions_and_input() -> None:
    identity = Identity(KEY)
    text = identity.implicit_id(None, {"instructions": "Be terse.", "input": "Hi"})
    items = identity.implicit_id(
        None,
        {"instructions": "Be terse.", "input": [{"role": "user", "content": "Hi"}, {"x": 1}]},
    )
    # A string input and a list starting with that user message are the same start.
    assert text is not None and text == items
    assert text != identity.implicit_id(None, {"instructions": "Be terse.", "input": "Hey"})


def test_prompt_cache_keys_are_keyed_hashes_never_the_id() -> None:
    identity = Identity(KEY)
    key = identity.prompt_cache_key("team-a", "ticket-4711")
    assert "ticket" not in key and len(key) == 32
    assert key == Identity(KEY).prompt_cache_key("team-a", "ticket-4711")
    assert key != identity.prompt_cache_key("team-b", "ticket-4711")
    assert key != identity.prompt_cache_key("team-a", "ticket-4712")
    assert key != Identity(b"j" * 32).prompt_cache_key("team-a", "ticket-4711")


@given(st.text(max_size=20), st.text(max_size=20), st.lists(st.text(max_size=10), max_size=4))
def test_later_turns_never_change_the_start(system: str, first: str, later: list[str]) -> None:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    turns = [{"role": "user" if i % 2 else "assistant", "content": t} for i, t in enumerate(later)]
    assert conversation_start({"messages": messages}) == conversation_start(
        {"messages": messages + turns}
    )
