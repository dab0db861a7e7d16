"""lasad-serve: the OpenAI Images endpoint over the slot scheduler. Tokens through HTTP equal the
engine's for the same seed, alone or among concurrent requests; bad requests are one line naming
the field; a full queue answers 429 and loses nothing admitted; streams carry every row; the
official openai client works unchanged; SIGTERM drains and exits 0; a client that goes away frees
its slot."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from lasad_engine import LasadConfig, LasadGen, save_checkpoint  # noqa: E402
from lasad_engine.engine import image_seeds  # noqa: E402
from lasad_engine.pipeline import LasadPipeline  # noqa: E402
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer  # noqa: E402

NAMES = [f"class {i}" for i in range(9)] + ["golden retriever"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=4, class_names=NAMES)
    save_checkpoint(folder / "m.pt", randomize_(LasadGen(cfg), 2), meta={"tokenizer": "vq.safetensors"})
    save_tokenizer(folder / "vq.safetensors", VQModel(VQ_PRESETS["vq-tiny"]))
    return folder / "m.pt"


def make_client(checkpoint, **engine):
    from lasad_engine.serve.app import create_app
    pipe = LasadPipeline.from_checkpoint(checkpoint, device="cpu", **{"max_batch": 4, **engine})
    return TestClient(create_app(pipe, max_images=8, warmup=False)), pipe


def engine_tokens(pipe, label, n, seed, grid=None, **params):
    """The reference: the engine itself with the seeds the server derives from the request's."""
    p = pipe.sampling_params(**params)
    req = pipe.engine.submit([label] * n, grid=grid, params=p, seeds=image_seeds(torch.Generator().manual_seed(seed), n))
    return pipe.engine.wait(req)


def post(client, **body):
    return client.post("/v1/images/generations", json=body)


def test_images_and_tokens_equal_the_engines(checkpoint):
    client, pipe = make_client(checkpoint)
    with client:
        r = post(client, prompt="golden retriever", n=3, seed=11, return_tokens=True, guidance_scale=3.0, top_k=20)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["data"][0]["class"] == 9
        want = engine_tokens(pipe, 9, 3, 11, cfg_scale=3.0, top_k=20)
        got = torch.tensor([d["tokens"] for d in body["data"]]).flatten(1)
        assert torch.equal(got, want)
        from PIL import Image
        img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert img.size == (8, 8) and img.format == "PNG"
        # the same request again: the same bytes
        again = post(client, prompt="golden retriever", n=3, seed=11, return_tokens=True, guidance_scale=3.0, top_k=20)
        assert again.json()["data"] == body["data"]
        # another size: the grid follows (8 px per 4 tokens here: the tokenizer's factor 2)
        r = post(client, prompt="3", size="12x8", seed=1, response_format="tokens")
        assert r.status_code == 200 and len(r.json()["data"][0]["tokens"]) == 4
        assert len(r.json()["data"][0]["tokens"][0]) == 6 and "b64_json" not in r.json()["data"][0]


def test_concurrent_http_requests_get_their_own_tokens(checkpoint):
    client, pipe = make_client(checkpoint, max_batch=3)
    cases = [dict(prompt=str(i % 10), n=1 + i % 3, seed=100 + i, return_tokens=True, response_format="tokens",
                  guidance_scale=[1.0, 2.0, 4.0][i % 3], size=["8x8", "12x8"][i % 2]) for i in range(9)]
    out = [None] * len(cases)
    with client:
        def call(i):
            time.sleep(0.05 * (i % 4))
            out[i] = post(client, **cases[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, c in enumerate(cases):
            assert out[i].status_code == 200, out[i].text
            grid = (4, 4) if c["size"] == "8x8" else (4, 6)
            want = engine_tokens(pipe, i % 10, c["n"], c["seed"], grid=grid, cfg_scale=c["guidance_scale"])
            got = torch.tensor([d["tokens"] for d in out[i].json()["data"]]).flatten(1)
            assert torch.equal(got, want), f"request {i} differs under concurrency"


@pytest.mark.parametrize("body,status,field,words", [
    ({"prompt": "3", "n": 0}, 422, "n", "greater than or equal to 1"),
    ({"prompt": "3", "n": 99}, 400, "n", "at most 8"),
    ({"prompt": "golden retreiver"}, 400, "prompt", "did you mean 'golden retriever'"),
    ({"class": 10}, 400, "class", "0..9"),
    ({"prompt": "3", "size": "9x8"}, 400, "size", "multiple of 2"),
    ({"prompt": "3", "size": "big"}, 400, "size", "WxH"),
    ({"prompt": "3", "response_format": "url"}, 422, "response_format", "'b64_json' or 'tokens'"),
    ({"prompt": "3", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "3", "guidance_scale": 1e9}, 400, "guidance_scale", "-100..100"),
    ({"prompt": "3", "seed": -1}, 422, "seed", "greater than or equal to 0"),
    ({"prompt": "3", "model": "dall-e-3"}, 400, "model", "'default'"),
    ({"prompt": "3", "temperature": "hot"}, 422, "temperature", "valid number"),
    ({"prompt": "3", "colour": "red"}, 422, "colour", "the fields are prompt"),
    ({}, 400, "prompt", "class name or id"),
])
def test_bad_requests_are_one_line_naming_the_field(checkpoint, body, status, field, words):
    client, _ = make_client(checkpoint)
    with client:
        r = post(client, **body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == field and words in err["message"] and "\n" not in err["message"]
        # nothing else was disturbed: a good request still works
        assert post(client, prompt="1", seed=0).status_code == 200


def test_malformed_json_and_wrong_body_type(checkpoint):
    client, _ = make_client(checkpoint)
    with client:
        for raw in (b'{"prompt": "3"', b"[1, 2]", b"\xff\xfe"):
            r = client.post("/v1/images/generations", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and "\n" not in r.json()["error"]["message"], r.text


def test_full_queue_gives_429_and_loses_nothing_admitted(checkpoint):
    client, pipe = make_client(checkpoint, max_batch=1, max_queue=0)
    results = []
    with client:
        def call(i):
            results.append((i, post(client, prompt=str(i), seed=i, response_format="tokens", size="16x16")))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for _, r in results)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        for i, r in results:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]["message"]
            else:
                want = engine_tokens(pipe, i, 1, i, grid=(8, 8))
                assert torch.equal(torch.tensor(r.json()["data"][0]["tokens"]).flatten()[None], want)
        metrics = client.get("/metrics").text
        assert f"lasad_rejected_total {float(codes.count(429))}" in metrics


def test_stream_sends_every_row_then_the_images(checkpoint):
    client, pipe = make_client(checkpoint)
    with client:
        with client.stream("POST", "/v1/images/generations",
                           json=dict(prompt="5", n=2, seed=4, stream=True, return_tokens=True)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        rows = [e for e in events if e["type"] == "image_generation.row"]
        done = [e for e in events if e["type"] == "image_generation.completed"]
        assert len(rows) == 2 * 4 and [e["progress"] for e in rows][-1] == 1.0
        assert len(done) == 2 and events[-1]["type"] == "done"
        want = engine_tokens(pipe, 5, 2, 4)
        for i in range(2):
            streamed = sorted((e["row"], e["tokens"]) for e in rows if e["index"] == i)
            assert torch.equal(torch.tensor([t for _, t in streamed]).flatten(), want[i])
            assert torch.equal(torch.tensor(done[i]["tokens"]).flatten(), want[i]) and done[i]["b64_json"]


def test_partial_images_are_the_rows_so_far_decoded(checkpoint):
    """partial_images=P: P events per image, in order, each the VQ decoding of exactly the rows
    finished so far (compared with the tokenizer run here on the final tokens' first rows), white below."""
    import numpy as np
    from PIL import Image
    from lasad_engine.pipeline import to_uint8
    from lasad_engine.serve.app import partial_rows
    for rows in (4, 7, 16):  # the rows at which they come: spread, distinct, never the last
        for count in range(1, rows):
            at = sorted(partial_rows(rows, count))
            assert len(at) == count and at[0] >= 1 and at[-1] <= rows - 1
    client, pipe = make_client(checkpoint)
    with client:
        size, grid = "12x8", (4, 6)  # 4 rows of 6 tokens, 2 px per token
        with client.stream("POST", "/v1/images/generations",
                           json=dict(prompt="2", n=2, seed=9, size=size, stream=True, partial_images=2)) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        want = engine_tokens(pipe, 2, 2, 9, grid=grid).view(2, *grid)
        assert all("tokens" not in e for e in events if e["type"] == "image_generation.row")
        for i in range(2):
            parts = [e for e in events if e["type"] == "image_generation.partial_image" and e["index"] == i]
            assert [p["partial_image_index"] for p in parts] == [0, 1] and [p["rows"] for p in parts] == [2, 3]
            last_row = max(k for k, e in enumerate(events) if e.get("index") == i and e["type"].endswith(".row"))
            assert all(events.index(p) < last_row for p in parts)  # before the image is finished
            for p in parts:
                got = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["b64_json"]))))
                ref = to_uint8(pipe.decode(want[i:i + 1, :p["rows"]]))[0]
                assert got.shape == (8, 12, 3)
                assert np.array_equal(got[:2 * p["rows"]], ref) and (got[2 * p["rows"]:] == 255).all()
        for body, words in ((dict(partial_images=2), "needs stream"),
                            (dict(partial_images=4, stream=True), "0..3"),
                            (dict(partial_images=1, stream=True, response_format="tokens"), "b64_json")):
            r = post(client, prompt="2", size=size, **body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images", r.text
            assert words in r.json()["error"]["message"]


def test_models_health_metrics(checkpoint):
    client, _ = make_client(checkpoint)
    with client:
        models = client.get("/v1/models").json()["data"][0]
        assert models["id"] == "default" and models["size"] == "8x8" and models["classes"] == NAMES
        assert client.get("/health").json()["status"] == "ok"
        post(client, prompt="1", seed=0)
        text = client.get("/metrics").text
        for name in ("lasad_queue_images", "lasad_active_images", "lasad_steps_per_second", "lasad_images_per_second",
                     "lasad_request_latency_seconds_bucket", "lasad_time_to_first_row_seconds_count",
                     "lasad_host_us_per_step", 'lasad_requests_total{status="200"}'):
            assert name in text, name
        # the running totals: one image alone was in every step, with its CFG pair of rows
        val = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        steps = val["lasad_steps_total"]
        assert steps > 0 and val["lasad_images_stepped_total"] == steps
        assert val["lasad_rows_stepped_total"] >= 2 * steps
        assert 0 < val["lasad_host_seconds_total"] <= val["lasad_step_seconds_total"]


def test_the_official_openai_client_works_unchanged(checkpoint):
    openai = pytest.importorskip("openai")
    client, pipe = make_client(checkpoint)
    with client:
        oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
        res = oa.images.generate(prompt="golden retriever", n=2, size="8x8", response_format="b64_json",
                                 extra_body={"seed": 5, "return_tokens": True})
        assert len(res.data) == 2 and res.data[0].b64_json
        want = engine_tokens(pipe, 9, 2, 5)
        got = torch.tensor([d.model_extra["tokens"] for d in res.data]).flatten(1)
        assert torch.equal(got, want)
        with pytest.raises(openai.BadRequestError, match="did you mean"):
            oa.images.generate(prompt="golden retreiver")


# --------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(checkpoint, *args):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "lasad_engine.serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--device", "cpu", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parents[1], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up")


def _active(url) -> int:
    return httpx.get(url + "/health", timeout=5).json()["active"]


def test_sigterm_drains_what_runs_and_exits_0(checkpoint):
    proc, url = _start_server(checkpoint, "--slots", "2", "--grace", "60")
    result = {}

    def call():
        result["r"] = httpx.post(url + "/v1/images/generations", timeout=120,
                                 json={"prompt": "2", "seed": 3, "size": "32x32", "response_format": "tokens"})

    t = threading.Thread(target=call)
    t.start()
    deadline = time.time() + 60
    while _active(url) == 0 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert result["r"].status_code == 200 and len(result["r"].json()["data"][0]["tokens"]) == 16
    assert "stopped (SIGTERM)" in err


def test_a_client_that_goes_away_frees_its_slot(checkpoint):
    proc, url = _start_server(checkpoint, "--slots", "1")
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(url + "/v1/images/generations", timeout=httpx.Timeout(5, read=1.5),
                       json={"prompt": "2", "size": "512x512", "response_format": "tokens"})
        deadline = time.time() + 30
        while _active(url) and time.time() < deadline:
            time.sleep(0.05)
        assert _active(url) == 0
        assert "lasad_cancelled_total 1.0" in httpx.get(url + "/metrics").text
        r = httpx.post(url + "/v1/images/generations", timeout=60, json={"prompt": "2", "response_format": "tokens"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
