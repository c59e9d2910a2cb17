"""The unseen-kinds set (`dapq.tasks.unseen`): deterministic samples that fit their length, the fact and its answer
in the context, a haystack (Python's bundled docs) that no training recipe reads, and answer kinds no training kind
or RULER task uses."""

from __future__ import annotations

import pytest

from dapq.errors import DapqError
from dapq.tasks import TaskArgs, select_tasks, task_samples
from dapq.tasks.metrics import score_prediction
from dapq.tasks.unseen import UNSEEN_KINDS, haystack_words, unseen_samples
from helpers import TinyTokenizer

TOK = TinyTokenizer()


@pytest.mark.parametrize("kind", UNSEEN_KINDS)
def test_samples_are_deterministic_fit_and_hold_their_answer(kind):
    a = unseen_samples(TOK, kind, 1500, 3, seed=0)
    assert [s.context for s in a] == [s.context for s in unseen_samples(TOK, kind, 1500, 3, seed=0)]
    assert len({s.context for s in a}) == 3
    for s in a:
        ctx, q = s.prompt_ids(TOK)
        assert len(ctx) + len(q) + s.max_new_tokens <= 1500
        assert s.references[0] in s.context and s.task == f"unseen/{kind}"
        assert score_prediction(s.metric, f"It is {s.references[0]}.", s.references, s.metadata) == 1.0
        assert score_prediction(s.metric, "I do not know.", s.references, s.metadata) == 0.0


def test_the_haystack_is_reserved_for_evaluation():
    """No training recipe reads Python's documentation, and its text is not the essays'."""
    from dapq.train.corpus import training_words
    from dapq.train.generic import TEXTS, sources

    docs = set(zip(*(haystack_words()[i:] for i in range(8))))
    for src in sources(TEXTS):
        assert not docs & set(zip(*(src.words[i:] for i in range(8)))), src.name
    assert len(docs & set(zip(*(training_words()[i:] for i in range(8))))) == 0


def test_registry_and_cli_names():
    assert select_tasks("unseen") == [f"unseen/{k}" for k in UNSEEN_KINDS]
    assert len(task_samples(TOK, "unseen/code", TaskArgs(lengths=(1000,), n=2))) == 2
    with pytest.raises(DapqError, match="Unknown unseen kind 'zip'"):
        select_tasks("unseen", "zip")
    twofact = unseen_samples(TOK, "twofact", 2000, 1)[0]
    assert len(twofact.metadata["depths"]) == 2
