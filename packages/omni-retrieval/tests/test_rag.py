"""RAG: the question's nearest chunks become numbered passages in front of it."""

from __future__ import annotations

from omni_retrieval.rag import Source, rag_messages


def test_messages_number_the_passages_and_keep_the_question_last():
    sources = [
        Source("/a/hamlet.txt", 0, 0.9, "To be,\\n or not"),
        Source("b/sea.txt", 16, 0.5, "a sea of troubles"),
    ]
    msgs = rag_messages("Who speaks?", sources)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == "Who speaks?"
    assert (
        "[1] (hamlet.txt) To be,\\n or not" in msgs[0]["content"]
        and "[2] (sea.txt) a sea of troubles" in msgs[0]["content"]
    )
