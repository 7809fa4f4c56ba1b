import json
import random
import string

import pytest

from thinkdiff.grpo.strategies import EmbeddingClusterer, LLMJudgeClusterer, judge_prompt, parse_judge_reply


@pytest.mark.parametrize("reply, labels", [
    ('Criteria: method.\n{"groups": [[1, 3], [2], [4]]}', [0, 1, 0, 2]),
    ('```json\n{"groups": [[2, 1], [4, 3]]}\n```', [0, 0, 1, 1]),
    ('{1: "Solution 1, Solution 2", 2: "Solution 3, Solution 4"}'.replace("1:", '"1":').replace("2:", '"2":'),
     [0, 0, 1, 1]),
    ("Group 1 – Algebra: Solution 1, Solution 4\nGroup 2 - Symmetry: Solution 2\nGroup 3: Solutions 3", [0, 1, 2, 0]),
    ("labels: [0, 0, 1, 2]", [0, 0, 1, 2]),
    ('first {"groups": [[1]]} then the final {"groups": [[1, 2, 3, 4]]}', [0, 0, 0, 0]),
])
def test_parser_reads_the_forms_judges_write(reply, labels):
    assert parse_judge_reply(reply, 4) == labels


@pytest.mark.parametrize("reply", [
    '{"groups": [[1, 2], [2, 3, 4]]}',  # solution 2 twice
    '{"groups": [[1, 2], [3]]}',  # solution 4 missing
    '{"groups": [[1, 2, 3, 4, 5]]}',  # no solution 5
    "I cannot decide.", "", '{"groups": "all"}', "[1, 2]", '{"groups": [[true, false]]}', None,
])
def test_parser_rejects_what_is_not_a_partition(reply):
    assert parse_judge_reply(reply, 4) is None


def test_prompt_has_the_papers_instruction_and_every_solution():
    prompt = judge_prompt("What is 2+2?", ["add them", "count up"])
    assert "Here are several solutions to the same question" in prompt
    assert "Solution 1:\nadd them" in prompt and "Solution 2:\ncount up" in prompt
    assert "total number of solutions (2)" in prompt


def test_judge_fuzz_never_crashes():
    rng = random.Random(0)
    pieces = ['{"groups": [[', "]]}", "Group 1:", "Solution", ",", "[", "{", "}", "]", '"', "1", "2", "3", "\n", "-1",
              "99", "null", "true", "\\", "é", "{{{{", "]]]]"]

    def chaos(prompt):
        kind = rng.random()
        if kind < 0.05:
            raise TimeoutError("judge timed out")
        if kind < 0.5:
            return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 200)))

    judge = LLMJudgeClusterer(chaos)
    for _ in range(300):
        k = rng.randint(2, 8)
        labels = judge.cluster("problem", [f"s{i}" for i in range(k)])
        assert len(labels) == k and all(isinstance(x, int) for x in labels)
    assert judge.calls == 300 and judge.failures > 250


def test_judge_uses_a_valid_reply_and_the_fallback_otherwise():
    class Fixed:
        def cluster(self, problem, solutions):
            return [0] * len(solutions)

    good = LLMJudgeClusterer(lambda p: json.dumps({"groups": [[1], [2, 3]]}), fallback=Fixed())
    assert good.cluster("q", ["a", "b", "c"]) == [0, 1, 1] and good.failures == 0
    bad = LLMJudgeClusterer(lambda p: "no idea", fallback=Fixed())
    assert bad.cluster("q", ["a", "b", "c"]) == [0, 0, 0] and bad.failures == 1


def test_embedding_clusterer_groups_paraphrases_offline():
    clusterer = EmbeddingClusterer(threshold=0.7)
    solutions = ["Add the two numbers: 3 + 4 = 7.", "Adding the numbers gives 3 + 4 = 7.",
                 "Draw a number line and count four steps to the right of three.",
                 "The capital of France is Paris."]
    labels = clusterer.cluster("What is 3 + 4?", solutions)
    assert labels[0] == labels[1]
    assert len({labels[0], labels[2], labels[3]}) == 3


def test_embedding_clusters_are_the_components_of_the_similarity_graph():
    """Single linkage cut at 1 - threshold = connected components of "cosine >= threshold" (reference: BFS)."""
    import numpy as np

    clusterer = EmbeddingClusterer.__new__(EmbeddingClusterer)
    rng = np.random.default_rng(0)
    for trial in range(20):
        emb = rng.normal(size=(8, 4))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        clusterer.threshold = float(rng.uniform(0.0, 0.9))
        clusterer.embed = lambda texts, emb=emb: emb
        labels = clusterer.cluster("", [str(i) for i in range(8)])
        similar = emb @ emb.T >= clusterer.threshold
        reference, seen = [None] * 8, 0
        for start in range(8):
            if reference[start] is None:
                stack = [start]
                while stack:
                    i = stack.pop()
                    if reference[i] is None:
                        reference[i] = seen
                        stack += [j for j in range(8) if similar[i, j] and reference[j] is None]
                seen += 1
        assert labels == reference, (trial, labels, reference)


def test_openai_judge_client_retries_and_reads_the_answer():
    """reward.judge=openai goes through the `openai` client: a 500 is retried, the key and the model are sent."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from thinkdiff.grpo.strategies import openai_ask

    seen = []

    class Chat(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body["model"], body["temperature"]))
            if len(seen) == 1:
                self.send_response(500)
                self.end_headers()
                return
            answer = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "[[1, 2], [3]]"}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ask = openai_ask(f"http://127.0.0.1:{server.server_port}/v1", "judge-model", api_key="k", timeout=10)
        assert ask("Group these answers.") == "[[1, 2], [3]]"
    finally:
        server.shutdown()
    assert seen == [("/v1/chat/completions", "Bearer k", "judge-model", 0)] * 2  # the 500, then the retry
