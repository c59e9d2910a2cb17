"""`dapq.Chat` and `dapq chat`: one document compressed once, the conversation kept in the cache.

Under FullKV a conversation equals plain transformers greedy decoding over the whole conversation's ids; the first
turn equals `answer_many`; under compression each layer holds the budget plus the conversation; the interactive
command is driven in a real terminal (tmux) on the bundled model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

from dapq import Chat, FullKV, answer_many, get_method
from dapq.errors import DapqError
from dapq.prompts import build_prompt, stop_token_ids
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, plain_greedy, until_stop

TOK = TinyTokenizer()
DOC = "the quick brown fox jumps over the lazy dog, then the dog sleeps in the sun all afternoon. " * 2
QUESTIONS = ["what jumps?", "and who sleeps?", "where?"]


def test_fullkv_conversation_equals_plain_greedy_over_the_whole_conversation():
    model = build_tiny("llama")
    chat = Chat(model, TOK, DOC, FullKV())
    stops = stop_token_ids(TOK)
    ctx, q = build_prompt(TOK, DOC, QUESTIONS[0])
    fed = ctx + q
    for k, question in enumerate(QUESTIONS):
        if k:
            fed += TOK.encode(f"\n\n{question}", add_special_tokens=False)
        out = chat.ask(question, max_new_tokens=5)
        ref, _ = plain_greedy(model, fed, 5)
        want = until_stop(ref, stops)
        assert out.token_ids[0] == want, f"turn {k}"
        fed += want  # every answer token is in the conversation (the last one is fed with the next turn)
    assert chat.stats()["conversation_tokens"] == len(fed) - len(ctx) - 1  # the last answer token is not fed yet


@pytest.mark.parametrize("method_name", ["snapkv", "dapq", "laq", "kvzip", "streamingllm"])
def test_compressed_first_turn_is_answer_many_and_the_cache_holds_budget_plus_conversation(method_name):
    model = build_tiny("llama")
    params = {"budget": 20, **METHOD_PARAMS.get(method_name, {})}
    method = get_method(method_name, **params)
    chat = Chat(model, TOK, DOC, method)
    first = chat.ask(QUESTIONS[0], max_new_tokens=6)
    assert first.text == answer_many(model, TOK, DOC, [QUESTIONS[0]], method, max_new_tokens=6)[0].text
    second = chat.ask(QUESTIONS[1], max_new_tokens=6)
    conv = chat.stats()["conversation_tokens"]
    assert conv == int(chat.cc.next_pos[0]) - len(chat.ctx_ids) and conv > len(second.token_ids[0])
    tracks = chat.cc.state.tracks
    # the budget is a mean over layers and heads (KVzip spreads it unevenly); every head holds the whole conversation
    kept = [float(track.valid[0].sum(-1).float().mean()) for track in tracks]
    assert sum(kept) / len(kept) == 20 + conv, (method_name, kept)
    for track in tracks:
        for pos in track.pos[0]:
            assert pos[-conv:].tolist() == list(range(len(chat.ctx_ids), len(chat.ctx_ids) + conv))
    assert 0 < chat.stats()["saved"] < 1


def test_chat_errors_are_one_line():
    model = build_tiny("llama")
    with pytest.raises(DapqError, match="document is empty"):
        Chat(model, TOK, "  ", FullKV())
    chat = Chat(model, TOK, DOC, FullKV())
    with pytest.raises(DapqError, match="question is empty"):
        chat.ask("   ")
    with pytest.raises(DapqError, match="positions"):
        chat.ask("what?", max_new_tokens=600)  # the tiny models have 512 positions


# ---------------------------------------------------------------------------------------------------- terminal
@pytest.mark.bundled
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_dapq_chat_in_a_real_terminal(bundled, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(
        "The lighthouse on Karren Point was built in 1874. Its first keeper, Ada Moreland, kept a logbook for "
        "forty-one years. In 1968 the station was automated and the cottage became a museum.",
        encoding="utf-8",
    )
    session = f"dapq-{uuid.uuid4().hex[:8]}"
    cmd = (
        f"{sys.executable} -m dapq chat --context-file {doc} --method snapkv --budget 16 --param window=4 "
        "--max-new-tokens 12; echo CHAT-ENDED-$?; sleep 30"
    )
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
        ).stdout

    def wait_for(text: str, count: int = 1, timeout: float = 120) -> str:
        end = time.time() + timeout
        while time.time() < end:
            shown = screen()
            if shown.count(text) >= count:
                return shown
            time.sleep(0.5)
        raise AssertionError(f"{text!r} x{count} never appeared:\n{screen()}")

    def send(text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", session, text, "Enter"], check=True)

    try:
        shown = wait_for("you>")  # tmux drops trailing spaces
        assert "93% saved" in shown or "saved" in shown
        send("Who was the first keeper?")
        shown = wait_for("saved", count=2)
        send("When was it automated?")
        shown = wait_for("saved", count=3)
        send("/quit")
        shown = wait_for("CHAT-ENDED-0")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    lines = shown.splitlines()
    asked = [i for i, line in enumerate(lines) if line.startswith("you> Who was") or line.startswith("you> When")]
    assert len(asked) == 2, shown
    assert "conversation: 0 tokens" in shown and "Traceback" not in shown
    conv = [int(line.split("conversation: ")[1].split()[0]) for line in lines if "conversation: " in line]
    assert conv[0] == 0 and conv[1] > 0 and conv[2] > conv[1], conv  # the conversation stays in the cache


def test_answer_prefix_is_fed_after_the_question():
    model = build_tiny("llama")
    method = get_method("snapkv", budget=20, window=4)
    chat = Chat(model, TOK, DOC, method)
    got = chat.ask(QUESTIONS[0], max_new_tokens=6, answer_prefix=" it is")
    want = answer_many(model, TOK, DOC, [QUESTIONS[0]], method, max_new_tokens=6, answer_prefix=" it is")[0]
    assert got.token_ids == want.token_ids
    before = int(chat.cc.next_pos[0])
    chat.ask(QUESTIONS[1], max_new_tokens=3, answer_prefix=" so")
    fed = int(chat.cc.next_pos[0]) - before  # the unfed token, "\n\n" + question + " so", and the answer's fed tokens
    assert fed >= len(TOK.encode(f"\n\n{QUESTIONS[1]} so", add_special_tokens=False))
