"""The server (FastAPI on uvicorn) and `RemoteEngine`: remote answers equal in-process ones, calls run one at a time
and are never merged, bad or oversized calls are refused before any engine work, clients that hang up are cancelled,
and every refusal is a 4xx JSON error while the server keeps serving."""

import argparse
import base64
import http.client
import io
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from thinkdiff.features import body_metadata, decode_states
from thinkdiff.pipeline import load_image
from thinkdiff.serve import HiddenStateServer, ServerLimits, add_serve_parser, build_server
from thinkdiff.vlm import HiddenStateEngine, SamplingConfig, VLMRequest
from thinkdiff.vlm.remote_engine import RemoteEngine

from .conftest import make_image

TOL = 1e-6
GREEDY = SamplingConfig(max_new_tokens=5)
MAX_BODY = 256 * 1024


class ProbeEngine(HiddenStateEngine):
    """Delegates to a real engine; records the size of each call, can hold calls at a gate, and fails on demand
    (prompt "CRASH": RuntimeError, prompt "INVALID": ValueError)."""

    def __init__(self, inner):
        self.inner = inner
        self.num_layers, self.hidden_size, self.max_images = inner.num_layers, inner.hidden_size, inner.max_images
        self.context_length = inner.context_length
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def generate(self, requests, layers, sampling=None, progress=True):
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        self.calls.append(len(requests))
        prompts = {r.prompt for r in requests}
        if "CRASH" in prompts:
            raise RuntimeError("boom: the engine crashed")
        if "INVALID" in prompts:
            raise ValueError("the engine rejects INVALID prompts")
        return self.inner.generate(requests, layers, sampling, progress=progress)

    def prompt_counter(self):
        return self.inner.prompt_counter()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    (allowed / "sub").mkdir(parents=True)
    make_image(64, 48, seed=1).save(allowed / "sub" / "pic.png")
    make_image(32, 32, seed=2).save(root / "outside.png")
    (allowed / "link.png").symlink_to(root / "outside.png")  # a symlink inside that points outside
    (allowed / "not-an-image.png").write_bytes(b"hello")
    return allowed


_SERVERS = {}


@pytest.fixture(scope="module")
def serve(engine, image_dir):
    """serve("mllama") -> (server, probe engine) on the session's tiny engine, started on port 0 in a thread."""

    def get(kind):
        if kind not in _SERVERS:
            probe = ProbeEngine(engine(kind))
            limits = ServerLimits(max_body_bytes=MAX_BODY, max_requests=16, max_images=8, max_new_tokens=64)
            server = HiddenStateServer(probe, port=0, model_name=f"tiny:{kind}", backend="transformers",
                                       allowed_image_dir=image_dir, limits=limits).start()
            _SERVERS[kind] = server, probe
        return _SERVERS[kind]

    yield get
    for server, _ in _SERVERS.values():
        server.close()
    _SERVERS.clear()


def call(url, method, path, body=None, headers=None):
    """(status, content type, body) of one raw HTTP call."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def post_json(url, payload):
    return call(url, "POST", "/generate", json.dumps(payload).encode(), {"Content-Type": "application/json"})


def assert_healthy(url):
    status, _, body = call(url, "GET", "/health")
    assert status == 200, body
    assert json.loads(body)["num_layers"] > 0


def assert_same(remote, local):
    assert len(remote) == len(local)
    for r, s in zip(remote, local):
        assert torch.equal(r.prompt_token_ids, s.prompt_token_ids)
        assert torch.equal(r.output_token_ids, s.output_token_ids)
        assert r.text == s.text
        assert list(r.input_embed) == list(s.input_embed) and list(r.output_embed) == list(s.output_embed)
        for layer in s.input_embed:
            assert r.input_embed[layer].dtype == s.input_embed[layer].dtype
            assert r.input_embed[layer].shape == s.input_embed[layer].shape
            assert r.output_embed[layer].shape == s.output_embed[layer].shape
            assert (r.input_embed[layer] - s.input_embed[layer]).abs().max() <= TOL
            if len(s.output_embed[layer]):
                assert (r.output_embed[layer] - s.output_embed[layer]).abs().max() <= TOL


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", ["llama", "mllama"])
def test_health_and_remote_shape(serve, engine, kind):
    server, _ = serve(kind)
    status, ctype, body = call(server.url, "GET", "/health")
    assert status == 200 and ctype == "application/json"
    info = json.loads(body)
    eng = engine(kind)
    assert info["model"] == f"tiny:{kind}" and info["backend"] == "transformers"
    assert (info["num_layers"], info["hidden_size"], info["max_images"]) == (eng.num_layers, eng.hidden_size,
                                                                            eng.max_images)
    remote = RemoteEngine(server.url, timeout=60)
    assert (remote.num_layers, remote.hidden_size, remote.max_images) == (eng.num_layers, eng.hidden_size,
                                                                          eng.max_images)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(max_new_tokens=6, do_sample=True, temperature=0.9,
                                                              top_p=0.95, seed=3)], ids=["greedy", "sampled"])
def test_llama_remote_equals_in_process(serve, engine, sampling):
    server, _ = serve("llama")
    requests = [VLMRequest("Describe a red apple in a few words."),
                VLMRequest("A photo of a cat sitting next to a blue car on a sunny street.", system="Be brief."),
                VLMRequest("one two three")]
    layers = [0, 2, -1]
    remote = RemoteEngine(server.url, timeout=60).generate(requests, layers, sampling)
    local = engine("llama").generate(requests, layers, sampling)
    assert_same(remote, local)
    assert sorted(remote[0].input_embed) == [0, 2, 4]


def test_llama_answers_only_and_layer_order(serve, engine):
    server, _ = serve("llama")
    requests = [VLMRequest("Describe a red apple.")]
    remote = RemoteEngine(server.url).generate(requests, [], GREEDY)
    assert_same(remote, engine("llama").generate(requests, [], GREEDY))
    assert remote[0].input_embed == {} and len(remote[0].output_token_ids) >= 1
    remote = RemoteEngine(server.url).generate(requests, [-1, 1, 4], GREEDY)  # -1 == 4: deduplicated, order kept
    assert list(remote[0].output_embed) == [4, 1]


def test_mllama_images_base64_and_allowed_path(serve, engine, image_dir):
    server, _ = serve("mllama")
    eng = engine("mllama")
    layers = [0, -1]
    # base64 (RemoteEngine), mixed with a text-only request in the same call
    requests = [VLMRequest("Describe the image concisely.", [make_image(70, 40)]), VLMRequest("A red apple.")]
    assert_same(RemoteEngine(server.url).generate(requests, layers, GREEDY), eng.generate(requests, layers, GREEDY))

    # by path, relative to the allowed folder and absolute; loaded as load_image does
    local = eng.generate([VLMRequest("Describe the image.", [load_image(image_dir / "sub" / "pic.png")])],
                         layers, GREEDY)
    for path in ["sub/pic.png", str(image_dir / "sub" / "pic.png"), "sub/../sub/pic.png"]:
        status, ctype, body = post_json(server.url, {
            "requests": [{"prompt": "Describe the image.", "images": [{"path": path}], "system": None}],
            "layers": layers, "sampling": {"max_new_tokens": 5}})
        assert status == 200 and ctype == "application/octet-stream", body
        assert_same(decode_states(body, 1, [0, eng.num_layers]), local)


def test_response_layout(serve):
    """The wire format: `i.<name>` tensors and metadata {"texts": JSON list}."""
    from safetensors.torch import load

    server, _ = serve("llama")
    status, _, body = post_json(server.url, {"requests": [{"prompt": "a"}, {"prompt": "b c"}], "layers": [1, -1],
                                             "sampling": {"max_new_tokens": 3, "min_new_tokens": 3}})
    assert status == 200
    tensors = load(body)
    assert set(tensors) == {f"{i}.{k}" for i in range(2) for k in
                            ["prompt_token_ids", "output_token_ids", "input_embed.1", "input_embed.4",
                             "output_embed.1", "output_embed.4"]}
    assert tensors["1.output_token_ids"].dtype == torch.int64 and tensors["1.output_token_ids"].shape == (3,)
    assert tensors["0.output_embed.4"].shape == (3, 128)
    assert len(json.loads(body_metadata(body)["texts"])) == 2


# ---------------------------------------------------------------------------------------------- concurrency


def test_eight_concurrent_clients(serve, engine):
    server, _ = serve("llama")
    requests = [VLMRequest(f"Describe a red apple {'in soft morning light ' * (i % 3)}number {i}.") for i in range(8)]
    layers = [0, 2, 4]
    local = [engine("llama").generate([r], layers, GREEDY)[0] for r in requests]
    remote = RemoteEngine(server.url, timeout=120)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(remote.generate, [r], layers, GREEDY) for r in requests]
        results = [f.result(timeout=120)[0] for f in futures]
    assert_same(results, local)
    assert_healthy(server.url)


def _wait(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _held(probe):
    """Hold the engine at its gate until the block ends."""
    probe.calls.clear()
    probe.entered.clear()
    probe.gate.clear()


def test_calls_run_one_at_a_time_in_arrival_order_never_merged(serve, engine):
    server, probe = serve("llama")
    remote = RemoteEngine(server.url, timeout=120)
    calls = [VLMRequest("first call holds the engine")] + [VLMRequest(f"greedy call {i}") for i in range(4)]
    expected = [engine("llama").generate([r], [0, -1], GREEDY)[0] for r in calls]
    _held(probe)
    with ThreadPoolExecutor(max_workers=8) as pool:
        try:
            futures = [pool.submit(remote.generate, [calls[0]], [0, -1], GREEDY)]
            _wait(probe.entered.is_set)
            for i, r in enumerate(calls[1:], 1):
                futures.append(pool.submit(remote.generate, [r], [0, -1], GREEDY))
                _wait(lambda n=i: server.worker.pending == n)
        finally:
            probe.gate.set()
        results = [f.result(timeout=120)[0] for f in futures]
    assert probe.calls == [1, 1, 1, 1, 1]  # five engine calls of one request each
    assert_same(results, expected)


def test_a_client_that_hangs_up_is_cancelled_before_the_engine(serve, engine):
    server, probe = serve("llama")
    remote = RemoteEngine(server.url, timeout=120)
    _held(probe)
    u = urllib.parse.urlsplit(server.url)
    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            head = pool.submit(remote.generate, [VLMRequest("holds the engine")], [0], GREEDY)
            _wait(probe.entered.is_set)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            conn.request("POST", "/generate", json.dumps({"requests": [{"prompt": "GONE"}]}),
                         {"Content-Type": "application/json"})
            _wait(lambda: server.worker.pending == 1)
            conn.sock.shutdown(2)  # the client hangs up while its call waits
            conn.close()
            _wait(lambda: server.worker.pending == 0)
        finally:
            probe.gate.set()
        head.result(timeout=120)
    assert remote.generate([VLMRequest("after")], [], GREEDY)[0].output_token_ids.numel() >= 1
    assert probe.calls == [1, 1]  # the hung-up call never ran
    assert server.worker.counts["cancelled"] >= 1


def test_a_call_past_its_deadline_gets_504_and_never_runs(engine):
    probe = ProbeEngine(engine("llama"))
    with HiddenStateServer(probe, port=0, limits=ServerLimits(request_timeout=1.0)).start() as server:
        _held(probe)
        with ThreadPoolExecutor(max_workers=2) as pool:
            try:
                head = pool.submit(post_json, server.url, {"requests": [{"prompt": "slow"}]})
                _wait(probe.entered.is_set)
                status, _, body = post_json(server.url, {"requests": [{"prompt": "late"}]})
                assert status == 504 and "deadline" in json.loads(body)["error"]
                assert json.loads(call(server.url, "GET", "/health")[2])["engine"]["state"] == "busy"
            finally:
                probe.gate.set()
            assert head.result(timeout=60)[0] == 504  # it ran, but past the deadline: its answer was dropped
        _wait(lambda: server.worker.health()["state"] == "idle")
        assert probe.calls == [1]  # "late" never reached the engine


def test_health_reports_a_stuck_engine(engine):
    probe = ProbeEngine(engine("llama"))
    with HiddenStateServer(probe, port=0, limits=ServerLimits(request_timeout=0.2)).start() as server:
        _held(probe)
        try:
            threading.Thread(target=post_json, args=(server.url, {"requests": [{"prompt": "x"}]}),
                             daemon=True).start()
            _wait(probe.entered.is_set)
            time.sleep(0.6)  # stuck_after = 2 x the request deadline
            status, _, body = call(server.url, "GET", "/health")
            assert status == 503 and json.loads(body)["engine"]["state"] == "stuck"
        finally:
            probe.gate.set()
        _wait(lambda: call(server.url, "GET", "/health")[0] == 200)


def test_32_concurrent_clients_all_answered(serve, engine):
    """The probe's failure: 4-24 of 256 calls reset by a listen backlog of 5. uvicorn's backlog is 2048."""
    server, _ = serve("llama")
    sampling = SamplingConfig(max_new_tokens=2)
    requests = [VLMRequest(f"client {i % 8}") for i in range(64)]
    expected = {r.prompt: engine("llama").generate([r], [], sampling)[0].text for r in requests[:8]}

    def client(r):
        return RemoteEngine(server.url, timeout=120).generate([r], [], sampling)[0].text

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(client, requests))
    assert answers == [expected[r.prompt] for r in requests]


# ---------------------------------------------------------------------------------------------- bad requests


def _req(**extra):
    return {"requests": [{"prompt": "Describe the image.", **extra}], "layers": [0], "sampling": {"max_new_tokens": 2}}


def _with(**fields):
    return {**_req(), **fields}


BAD = {
    "malformed json": (b'{"requests": [', 400),
    "not utf-8": (b"\xff\xfe{}", 400),
    "not an object": (b"[1, 2]", 400),
    "unknown top-level field": (_with(layer=[0]), 400),
    "no requests": (_with(requests=[]), 400),
    "unknown layer": (_with(layers=[99]), 400),
    "layer not an int": (_with(layers=["-1"]), 400),
    "layer bool": (_with(layers=[True]), 400),
    "unknown sampling field": (_with(sampling={"temprature": 0.5}), 400),
    "sampling wrong type": (_with(sampling={"max_new_tokens": "5"}), 400),
    "sampling out of range": (_with(sampling={"max_new_tokens": 0}), 400),
    "min above max": (_with(sampling={"max_new_tokens": 2, "min_new_tokens": 3}), 400),
    "seed out of range": (_with(sampling={"seed": 2**70}), 400),
    "deeply nested json": (b"[" * 100_000, 400),
    "temperature zero": (_with(sampling={"do_sample": True, "temperature": 0}), 400),
    "max_new_tokens above server limit": (_with(sampling={"max_new_tokens": 65}), 400),
    "empty prompt": ({"requests": [{"prompt": "  "}]}, 400),
    "prompt not a string": ({"requests": [{"prompt": 3}]}, 400),
    "unknown request field": (_req(image="x"), 400),
    "marker count mismatch": ({"requests": [{"prompt": "<image> and <image>", "images": []}]}, 400),
    "invalid base64": (_req(images=[{"base64": "@@not base64@@"}]), 400),
    "undecodable image": (_req(images=[{"base64": base64.b64encode(b"not an image").decode()}]), 400),
    "image without kind": (_req(images=[{"url": "http://x/y.png"}]), 400),
    "image with both kinds": (_req(images=[{"path": "sub/pic.png", "base64": ""}]), 400),
    "path outside (..)": (_req(images=[{"path": "../outside.png"}]), 403),
    "path outside (absolute)": (_req(images=[{"path": "/etc/passwd"}]), 403),
    "path outside (symlink)": (_req(images=[{"path": "link.png"}]), 403),
    "path missing": (_req(images=[{"path": "sub/missing.png"}]), 400),
    "path is a folder": (_req(images=[{"path": "sub"}]), 400),
    "path not an image": (_req(images=[{"path": "not-an-image.png"}]), 400),
    "too many requests": ({"requests": [{"prompt": "a"}] * 17}, 413),
    "too many images": ({"requests": [{"prompt": "a", "images": [{"path": "sub/pic.png"}] * 9}]}, 413),
    "oversize payload": (_req(system="x" * (MAX_BODY + 1)), 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_4xx_and_server_keeps_serving(serve, case):
    server, _ = serve("mllama")
    body, expected = BAD[case]
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    status, ctype, answer = call(server.url, "POST", "/generate", body, {"Content-Type": "application/json"})
    assert status == expected, answer
    assert ctype == "application/json"
    assert isinstance(json.loads(answer)["error"], str) and json.loads(answer)["error"]
    assert_healthy(server.url)


def test_http_level_errors(serve):
    server, probe = serve("llama")
    calls = len(probe.calls)
    json_type = {"Content-Type": "application/json"}
    for method, path, body, headers, expected in [
        ("GET", "/nope", None, {}, 404),
        ("POST", "/nope", b"{}", json_type, 404),
        ("DELETE", "/generate", None, {}, 405),
        ("POST", "/generate", _req(), {}, 415),  # no JSON content type (what a cross-site form sends)
        ("POST", "/generate", _req(), {"Content-Type": "text/plain"}, 415),
        ("POST", "/generate", None, json_type, 411),  # no Content-Length
        ("POST", "/generate", b"", {**json_type, "Content-Length": "-3"}, 400),  # refused by the HTTP parser
        ("POST", "/generate", b"{}", {**json_type, "Content-Length": str(10 ** 12)}, 413),  # declared, never sent
        ("POST", "/generate", b"{}", {**json_type, "Content-Length": str(MAX_BODY + 1), "Expect": "100-continue"},
         413),
        ("POST", "/generate", _req(images=[{"path": "sub/pic.png"}]), json_type, 400),  # llama takes no images
    ]:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        u = urllib.parse.urlsplit(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.putrequest(method, path)
            for k, v in headers.items():
                conn.putheader(k, v)
            if body is not None and "Content-Length" not in headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body is not None and "Expect" not in headers else None)
            response = conn.getresponse()
            answer = response.read()
            assert response.status == expected, (method, path, answer)
            if headers.get("Content-Length") != "-3":
                assert json.loads(answer)["error"]
        finally:
            conn.close()
        assert_healthy(server.url)
    assert len(probe.calls) == calls  # none of them reached the engine


def test_remote_client_errors(serve):
    server, probe = serve("llama")
    remote = RemoteEngine(server.url, timeout=60)
    with pytest.raises(ValueError, match="out of range"):  # checked before sending, same message as in-process
        remote.generate([VLMRequest("a")], [5])
    with pytest.raises(ValueError, match="at most 0"):
        remote.generate([VLMRequest("a", [make_image(8, 8)])], [0])
    with pytest.raises(ValueError, match="server's limit of 64"):  # a 4xx from the server
        remote.generate([VLMRequest("a")], [0], SamplingConfig(max_new_tokens=100))
    with pytest.raises(RuntimeError, match="boom"):  # a 500 from the server
        remote.generate([VLMRequest("CRASH")], [0])
    assert_healthy(server.url)
    assert len(remote.generate([VLMRequest("still fine")], [0], GREEDY)) == 1
    # more requests than the server takes per call: the client splits them
    many = [VLMRequest(f"r {i}") for i in range(20)]
    assert [s.text for s in remote.generate(many, [], GREEDY)] == \
        [s.text for s in probe.inner.generate(many, [], GREEDY)]
    with pytest.raises(ConnectionError):
        RemoteEngine("http://127.0.0.1:9", timeout=5)
    with pytest.raises(ValueError, match="URL"):
        RemoteEngine("file:///etc/passwd")


def test_image_paths_disabled_without_allowed_dir(engine):
    with HiddenStateServer(ProbeEngine(engine("mllama")), port=0).start() as server:
        status, _, body = post_json(server.url, _req(images=[{"path": "/etc/passwd"}]))
        assert status == 403 and "disabled" in json.loads(body)["error"]
        assert_healthy(server.url)


def test_serve_cli_and_make_engine(tiny, image_dir):
    from thinkdiff.config import VLMConfig
    from thinkdiff.vlm import make_engine

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(tiny("llama")), "--port", "0",
                              "--allowed-image-dir", str(image_dir), "--max-requests", "4"])
    assert args.func.__name__ == "cmd_serve" and args.host == "127.0.0.1"
    with build_server(args).start() as server:
        remote = make_engine(VLMConfig(model=server.url, backend="remote"))
        assert isinstance(remote, RemoteEngine) and remote.max_requests == 4
        assert len(remote.generate([VLMRequest(f"q {i}") for i in range(6)], [-1], GREEDY)) == 6


# ---------------------------------------------------------------------------------------------- admission


def test_prompts_past_the_context_are_refused_before_any_work(serve, engine):
    server, probe = serve("llama")
    eng = engine("llama")
    counter = eng.prompt_counter()
    words = "apple " * 2000
    fits = next(n for n in range(2000, 0, -50) if counter(VLMRequest(words[:6 * n])) <= eng.context_length - 64)
    calls = len(probe.calls)
    for prompt, tokens, message in [
        ("x" * 200_000, 2, "characters"),  # like the probe's 1 MB prompt: refused without tokenising
        (words, 2, "exceed this model's context of 2048"),  # ~2,000 words
        (words[:6 * fits] + "apple " * 40, 64, "max_new_tokens is 64"),  # fits alone, not with 64 new tokens
    ]:
        status, _, body = post_json(server.url, {"requests": [{"prompt": prompt}],
                                                 "sampling": {"max_new_tokens": tokens}})
        assert status == 400 and message in json.loads(body)["error"], body
    assert len(probe.calls) == calls  # no engine work for any of them
    status, _, _ = post_json(server.url, {"requests": [{"prompt": words[:6 * fits]}],
                                          "sampling": {"max_new_tokens": 64}})
    assert status == 200 and len(probe.calls) == calls + 1


def test_images_are_refused_by_pixels_before_decoding(serve):
    server, probe = serve("mllama")
    calls = len(probe.calls)
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # 25 Mpx in a few KB, like the probe's 6324x6324 PNG
    assert len(buf.getvalue()) < 100_000
    status, _, body = post_json(server.url, _req(images=[{"base64": base64.b64encode(buf.getvalue()).decode()}]))
    assert status == 400 and "5000x5000" in json.loads(body)["error"]
    assert len(probe.calls) == calls


def test_api_key_required_and_checked(engine):
    with pytest.raises(ValueError, match="API key"):
        HiddenStateServer(engine("llama"), host="0.0.0.0", port=0)
    with HiddenStateServer(engine("llama"), port=0, api_key="s3cret").start() as server:
        payload = json.dumps({"requests": [{"prompt": "hi"}], "sampling": {"max_new_tokens": 2}}).encode()
        for headers, expected in [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                  ({"Authorization": "Basic s3cret"}, 401), ({"Authorization": "Bearer s3cret"}, 200)]:
            status, _, body = call(server.url, "POST", "/generate", payload,
                                   {"Content-Type": "application/json", **headers})
            assert status == expected, body
        assert call(server.url, "GET", "/metrics")[0] == 401
        assert len(RemoteEngine(server.url, api_key="s3cret").generate([VLMRequest("hi")], [], GREEDY)) == 1
        with pytest.raises(ValueError, match="401"):
            RemoteEngine(server.url).generate([VLMRequest("hi")], [], GREEDY)


def test_metrics_count_calls_tokens_and_queue(serve):
    from prometheus_client.parser import text_string_to_metric_families

    server, _ = serve("llama")

    def samples():
        status, ctype, body = call(server.url, "GET", "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    before = samples()
    ok = ("thinkdiff_requests_total", (("endpoint", "/generate"), ("status", "200")))
    bad = ("thinkdiff_requests_total", (("endpoint", "/generate"), ("status", "400")))
    generated = ("thinkdiff_tokens_total", (("kind", "generated"),))
    post_json(server.url, {"requests": [{"prompt": "a"}, {"prompt": "b"}],
                           "sampling": {"max_new_tokens": 3, "min_new_tokens": 3}})
    post_json(server.url, {"requests": []})
    after = samples()
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    assert after[generated] == before.get(generated, 0) + 6
    assert after[("thinkdiff_queue_depth", ())] == 0
    assert after[("thinkdiff_request_seconds_count", (("endpoint", "/generate"),))] >= 2


# ---------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def image_server(tiny):
    from pathlib import Path

    from thinkdiff.pipeline import ThinkDiffPipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    pipe = ThinkDiffPipeline.from_config(config, ["decoder.num_inference_steps=2", "vlm.max_new_tokens=4",
                                                  "vlm.min_new_tokens=4"])
    with HiddenStateServer(pipe.engine, port=0, pipeline=pipe).start() as server:
        yield server, pipe


def test_images_endpoint_equals_the_pipeline(image_server):
    from PIL import Image

    server, pipe = image_server
    context = make_image(40, 30, seed=4)
    prompt = "Word 1: blue, <image> Word 2: red,"
    status, ctype, body = post_json_to(server.url, "/v1/images/generations", {
        "prompt": prompt, "images": [png_base64(context)], "n": 2, "size": "64x32", "seed": 5,
        "response_format": "b64_json"})
    assert status == 200 and ctype == "application/json", body
    answer = json.loads(body)
    sent = Image.open(io.BytesIO(base64.b64decode(png_base64(context))))  # what the server decodes
    local = pipe(prompt, [sent], num_images=2, seed=5, width=64, height=32, progress=False)
    assert answer["answer"] == local.text[0] and len(answer["data"]) == 2
    assert set(answer["timings"]) == {"vlm", "aligner", "decoder"} and answer["settings"]["seed"] == 5
    for item, expected in zip(answer["data"], local.images):
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.size == (64, 32)
        assert image.tobytes() == expected.tobytes()  # PNG is lossless: the pipeline's own pixels


@pytest.mark.parametrize("payload, message", [
    ({"prompt": "a", "size": "big"}, "size"),
    ({"prompt": "a", "response_format": "url"}, "response_format"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "images": ["@@"]}, "invalid base64"),
    ({"prompt": "a", "size": "5000x5000"}, "limit"),
    ({"prompt": "a", "style": "vivid"}, "style"),
])
def test_images_endpoint_refuses_bad_calls(image_server, payload, message):
    server, _ = image_server
    status, _, body = post_json_to(server.url, "/v1/images/generations", payload)
    assert status == 400 and message in json.loads(body)["error"], body


def test_states_only_server_has_no_images_endpoint(serve):
    server, _ = serve("llama")
    status, _, body = post_json_to(server.url, "/v1/images/generations", {"prompt": "a"})
    assert status == 404 and "--config" in json.loads(body)["error"]


def post_json_to(url, path, payload):
    return call(url, "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def test_a_slow_body_gets_408_and_holds_nothing(engine, caplog):
    """The probe's slowloris: a body shorter than its Content-Length held a thread for 120 s and ended in a 500.
    Now the body read has its own deadline (408), and no traceback is logged."""
    import logging
    import socket

    probe = ProbeEngine(engine("llama"))
    with caplog.at_level(logging.INFO, logger="thinkdiff"), \
            HiddenStateServer(probe, port=0, limits=ServerLimits(body_timeout=0.5)).start() as server:
        u = urllib.parse.urlsplit(server.url)
        with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"requests\": ")
            start = time.monotonic()
            answer = sock.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 408") and time.monotonic() - start < 10, answer
        assert_healthy(server.url)
        assert probe.calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
