"""The slot scheduler: requests join and leave a running batch, and each one's tokens are exactly
what it gets alone (byte for byte), whatever else runs; cancellation, a full queue, a draining
shutdown and a failing request touch nothing else; threads and asyncio share the batch."""

import asyncio
import random
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
from conftest import randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.engine import LasadEngine, QueueFull, RequestFailed, SamplingParams


def tiny(seed=0):
    cfg = LasadConfig.from_preset("lasad-tiny")
    return randomize_(LasadGen(cfg), seed).eval()


def random_requests(n, seed):
    """Mixed classes, seeds, guidance on and off, top-k / top-p / greedy, two grids."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        params = SamplingParams(cfg_scale=rng.choice([1.0, 2.5, 4.0]), temperature=rng.choice([0.0, 0.7, 1.0]),
                                top_k=rng.choice([0, 5, 40]), top_p=rng.choice([1.0, 0.8]),
                                cfg_interval=rng.choice([-1, 6]))
        out.append(dict(labels=[rng.randrange(10) for _ in range(rng.randint(1, 3))], grid=rng.choice(["5x7", "3x4"]),
                        params=params, seed=rng.randrange(1 << 30)))
    return out


def alone(engine, r):
    return engine.generate(r["labels"], grid=r["grid"], params=r["params"],
                           generator=torch.Generator().manual_seed(r["seed"]))


def test_byte_identical_alone_and_among_requests_that_join_and_leave():
    """Each request alone (its own engine) against the same requests sent from threads at random
    moments into an engine with fewer slots than images: images join and leave at random steps,
    share buckets of different sizes with different neighbours, and still give identical tokens."""
    model = tiny()
    reqs = random_requests(14, seed=3)
    solo = LasadEngine(model, max_batch=4)
    want = [alone(solo, r) for r in reqs]
    solo.close()

    engine = LasadEngine(model, max_batch=5)
    got = [None] * len(reqs)
    rng = random.Random(7)
    delays = [rng.uniform(0, 0.4) for _ in reqs]

    def client(i):
        time.sleep(delays[i])
        got[i] = alone(engine, reqs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = engine.stats()
    engine.close()
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b), f"request {i} ({reqs[i]}) differs under load"
    # the load did overlap: more image-steps than steps, so images shared steps
    assert stats["images_stepped"] > stats["steps"]


def test_rows_are_reported_once_each_in_order_with_their_tokens():
    """on_row under load: requests of mixed grids join at random moments, some with a per-step
    hook (visited every step) and some without (their rows kept by the step they finish at); every
    image reports each of its rows exactly once, in order, with the tokens its final result has
    there; a request cancelled on the way reports a prefix of its rows and nothing after."""
    model = tiny(2)
    reqs = random_requests(10, seed=11)
    engine = LasadEngine(model, max_batch=3)
    rows = [[] for _ in reqs]
    lock = threading.Lock()
    rng = random.Random(5)
    delays = [rng.uniform(0, 0.3) for _ in reqs]
    hooked = [i % 3 == 0 for i in range(len(reqs))]
    results = [None] * len(reqs)
    victim = 4

    def client(i):
        r = reqs[i]
        time.sleep(delays[i])

        second_row = threading.Event()

        def on_row(index, row, tokens, event):
            with lock:
                rows[i].append((index, row, tokens.clone()))
            if row == 1:
                second_row.set()
        seeds = [rng.randrange(1 << 30) for _ in r["labels"]]
        req = engine.submit(r["labels"], grid=r["grid"], params=r["params"], seeds=seeds, on_row=on_row,
                            row_tokens=True, on_step=(lambda q, imgs: None) if hooked[i] else None)
        if i == victim and second_row.wait(30):
            req.cancel()
        try:
            results[i] = engine.wait(req)
        except CancelledError:
            results[i] = "cancelled"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    for i, r in enumerate(reqs):
        h, w = (int(x) for x in r["grid"].split("x"))
        n = len(r["labels"])
        if results[i] == "cancelled":
            for k in range(n):
                got = [row for index, row, _ in rows[i] if index == k]
                assert got == list(range(len(got))) and len(got) <= h
            continue
        tokens = results[i].view(n, h, w)
        for k in range(n):
            got = [(row, tok) for index, row, tok in rows[i] if index == k]
            assert [row for row, _ in got] == list(range(h)), (i, k, [row for row, _ in got])
            for row, tok in got:
                assert torch.equal(tok, tokens[k, row]), (i, k, row)


def test_tokens_do_not_depend_on_the_order_of_images_in_the_step():
    """The same images admitted in two orders (rows laid out differently) give the same tokens."""
    model = tiny(1)
    reqs = random_requests(6, seed=11)
    results = []
    for order in (list(range(6)), list(reversed(range(6)))):
        engine = LasadEngine(model, max_batch=16)
        handles = {}
        for i in order:
            r = reqs[i]
            handles[i] = engine.submit(r["labels"], grid=r["grid"], params=r["params"],
                                       generator=torch.Generator().manual_seed(r["seed"]))
        results.append([engine.wait(handles[i]) for i in range(6)])
        engine.close()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cancel_frees_the_slot_at_the_next_step():
    model = tiny()
    engine = LasadEngine(model, max_batch=1)
    params = SamplingParams(cfg_scale=2.0)
    seen = []

    def stop_after_three(req, images):
        seen.append(images[0].pos)
        if len(seen) == 3:
            req.cancel()

    long = engine.submit([1], grid="8x8", params=params, generator=torch.Generator().manual_seed(0),
                         on_step=stop_after_three)
    short = engine.submit([2], params=params, generator=torch.Generator().manual_seed(1))
    with pytest.raises(CancelledError):
        long.result(timeout=60)
    got = engine.wait(short, timeout=60)
    assert seen == [1, 2, 3]  # the cancelled image ran no step after the one that cancelled it
    assert torch.equal(got, LasadEngine(model, max_batch=1).generate(
        [2], params=params, generator=torch.Generator().manual_seed(1)).flatten(1))
    assert engine.scheduler.free_slots == [0] and not engine.scheduler.active
    engine.close()


def test_full_queue_refuses_and_loses_nothing_admitted():
    model = tiny()
    params = SamplingParams(cfg_scale=3.0, top_k=10)
    engine = LasadEngine(model, max_batch=1, max_queue=1)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    a = engine.submit([1], params=params, generator=gens[0])
    b = engine.submit([2], params=params, generator=gens[1])
    with pytest.raises(QueueFull, match="queue is full") as e:
        engine.submit([3], params=params, generator=gens[2])
    assert e.value.retry_after > 0 and engine.stats()["rejected"] == 1
    ref = LasadEngine(model, max_batch=1)
    for req, label, seed in ((a, 1, 0), (b, 2, 1)):
        want = ref.generate([label], params=params, generator=torch.Generator().manual_seed(seed)).flatten(1)
        assert torch.equal(engine.wait(req, timeout=60), want)
    engine.close()


def test_drain_finishes_what_runs_and_admits_nothing_new():
    model = tiny()
    engine = LasadEngine(model, max_batch=2)
    params = SamplingParams(cfg_scale=2.0)
    running = engine.submit([4, 5], params=params, generator=torch.Generator().manual_seed(2))
    while not engine.scheduler.active:
        time.sleep(0.001)
    closer = threading.Thread(target=engine.close, kwargs=dict(drain=True, timeout=60))
    closer.start()
    time.sleep(0.01)
    with pytest.raises(Exception, match="shutting down|closed"):
        engine.submit([1], params=params)
    closer.join()
    want = LasadEngine(model, max_batch=2).generate([4, 5], params=params,
                                                    generator=torch.Generator().manual_seed(2)).flatten(1)
    assert torch.equal(engine.wait(running, timeout=1), want)


def test_a_request_with_non_finite_logits_fails_alone():
    model = tiny()
    with torch.no_grad():
        model.cls_embedding.embedding_table.weight[7] = float("nan")
    engine = LasadEngine(model, max_batch=4)
    params = SamplingParams(cfg_scale=2.0, top_k=20)
    bad = engine.submit([7], params=params, generator=torch.Generator().manual_seed(0))
    good = engine.submit([3, 4], params=params, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RequestFailed, match="non-finite"):
        engine.wait(bad, timeout=60)
    got = engine.wait(good, timeout=60)
    clean = tiny()
    want = LasadEngine(clean, max_batch=4).generate([3, 4], params=params,
                                                    generator=torch.Generator().manual_seed(1)).flatten(1)
    assert torch.equal(got, want)
    engine.close()


def test_asyncio_calls_join_the_batch():
    model = tiny()
    reqs = random_requests(5, seed=5)
    engine = LasadEngine(model, max_batch=8)
    want = [alone(engine, r) for r in reqs]

    async def main():
        return await asyncio.gather(*(engine.agenerate(r["labels"], grid=r["grid"], params=r["params"],
                                                       generator=torch.Generator().manual_seed(r["seed"]))
                                      for r in reqs))

    got = asyncio.run(main())
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    engine.close()


@pytest.mark.parametrize("policy", ["static", "lock"])
def test_baseline_policies_give_the_same_tokens(policy):
    """The baselines serve_bench compares against (a static batcher, one request at a time) run
    the same loop with another admission rule: same tokens, no overlap under `lock`."""
    model = tiny()
    reqs = random_requests(4, seed=9)
    ref = LasadEngine(model, max_batch=8)
    want = [alone(ref, r) for r in reqs]
    engine = LasadEngine(model, max_batch=8, policy=policy, batch_wait=0.02)
    handles = [engine.submit(r["labels"], grid=r["grid"], params=r["params"],
                             generator=torch.Generator().manual_seed(r["seed"])) for r in reqs]
    for h, w in zip(handles, want):
        assert torch.equal(engine.wait(h, timeout=60), w.flatten(1))
    spans = sorted((min(img.started for img in h.images), h.finished_step) for h in handles)
    if policy == "lock":  # one request at a time: the loop steps of two requests never overlap
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    engine.close()


def test_a_bare_cuda_device_gets_the_callers_index(monkeypatch):
    """A bare "cuda" becomes cuda:N of the caller's current device (the decode thread selects it with
    torch.cuda.set_device, which refuses a bare "cuda", and a new thread starts on device 0); an
    indexed device and the cpu stay as given. Found on an H100: the engine's decode thread failed
    with set_device("cuda"). The current device is faked, so this runs without a GPU."""
    from lasad_engine.params import with_index

    current = random.Random().randrange(1, 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert with_index(torch.device("cuda")) == torch.device("cuda", current)
    assert with_index(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert with_index(torch.device("cpu")) == torch.device("cpu")
