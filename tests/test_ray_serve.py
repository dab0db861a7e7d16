"""lasad-serve on Ray Serve: a local Ray instance on 127.0.0.1 with 2 replicas, each with its own
engine, answers with the tokens the engine gives for the same request, from both replicas."""

import socket
import time

import pytest
import torch
from conftest import randomize_

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from lasad_engine import LasadConfig, LasadGen, save_checkpoint  # noqa: E402
from lasad_engine.engine import LasadEngine, SamplingParams, image_seeds  # noqa: E402
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_answer_correctly(tmp_path):
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=4)
    model = randomize_(LasadGen(cfg), 4)
    save_checkpoint(tmp_path / "m.pt", model, meta={"tokenizer": "vq.safetensors"})
    save_tokenizer(tmp_path / "vq.safetensors", VQModel(VQ_PRESETS["vq-tiny"]))
    from lasad_engine.serve.ray_app import build_app

    port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
             log_to_driver=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"checkpoint": str(tmp_path / "m.pt"), "device": "cpu", "slots": 2, "num_replicas": 2,
                             "warmup": False}), name="lasad", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ref = LasadEngine(model.eval(), max_batch=2)
        params = SamplingParams(cfg_scale=4.0, top_k=2000)
        seen = set()
        for i in range(10):
            r = httpx.post(url + "/v1/images/generations", timeout=120,
                           json={"prompt": str(i % 10), "seed": i, "response_format": "tokens", "guidance_scale": 4.0,
                                 "top_k": 2000})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-lasad-instance"])
            want = ref.wait(ref.submit([i % 10], params=params, seeds=image_seeds(torch.Generator().manual_seed(i), 1)))
            assert torch.equal(torch.tensor(r.json()["data"][0]["tokens"]).flatten()[None], want)
        assert len(seen) == 2, f"answered by {seen}"
        ref.close()
    finally:
        serve.shutdown()
        ray.shutdown()
