"""Two replicas of the embedded model on a local Ray head, behind one OpenAI endpoint.

One Ray session for the module: `local_cluster` starts the head and the Serve application
(each replica loads the real model once), and `single` is single-process serving with the same
flags, the reference for outputs and errors. The fault test runs last: it kills a replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.deploy.support import DOCKER, ensure_prometheus_tools, start_prometheus

from .reference import single_process_server, wait_ready
from .support import (
    API_KEY,
    APP_NAME,
    REAL_MODEL_FLAGS,
    LocalCluster,
    StreamResult,
    local_cluster,
    stream_chat,
    wait_until,
)

pytestmark = pytest.mark.slow

# Capacity of each replica: 8 running + 8 waiting; more get 429 from the replica itself.
FLAGS = [*REAL_MODEL_FLAGS, "--api-key", API_KEY, "--max-queue", "8"]
TOPICS = ["the sea", "a mountain", "rain", "the moon", "a city", "bread", "a river", "winter",
          "a library", "coffee", "a garden", "trains", "the desert", "music", "a lighthouse",
          "autumn"]
QUESTIONS = [f"Write one sentence about {t}." for t in TOPICS]


def chat(question: str, max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def async_client(base_url: str, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=120, limits=httpx.Limits(max_connections=64), **kw)


async def stream_all(base_url: str, bodies: list[dict[str, Any]]) -> list[StreamResult]:
    async with async_client(base_url) as client:
        return list(await asyncio.gather(*(stream_chat(client, b) for b in bodies)))


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LocalCluster, str]]:
    """The cluster, and the single-process server, which loads while the Ray head starts."""
    layout = ["--replicas", "2", "--threads-per-replica", "1"]
    with single_process_server(FLAGS) as single_url, local_cluster([*FLAGS, *layout]) as running:
        wait_ready(single_url)
        yield running, single_url


@pytest.fixture(scope="module")
def cluster(servers: tuple[LocalCluster, str]) -> LocalCluster:
    return servers[0]


@pytest.fixture(scope="module")
def single(servers: tuple[LocalCluster, str]) -> str:
    return servers[1]


@pytest.fixture(scope="module")
def expected(single: str) -> list[str]:
    """Greedy answers to QUESTIONS from single-process serving, 16 streams at once."""
    results = asyncio.run(stream_all(single, [chat(q) for q in QUESTIONS]))
    assert all(r.done and r.error is None for r in results)
    return [r.text for r in results]


def replica_metric(cluster: LocalCluster, name: str) -> dict[str, float]:
    """replica tag -> summed value of one series on that replica's own metrics listener."""
    out: dict[str, float] = {}
    for target in cluster.replica_targets():
        text = httpx.get(f"http://{target['targets'][0]}/metrics", timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith((name + "{", name + " "))]
        out[target["labels"]["replica"]] = sum(values)
    return out


def test_sixteen_streams_through_one_endpoint_equal_single_process(
    cluster: LocalCluster, expected: list[str]
) -> None:
    before = replica_metric(cluster, "dspark_request_success_total")
    results = asyncio.run(stream_all(cluster.base_url, [chat(q) for q in QUESTIONS]))
    assert [(r.status, r.done, r.error) for r in results] == [(200, True, None)] * 16
    assert [r.text for r in results] == expected
    served_by = {r.replica for r in results}
    assert len(served_by) == 2 and None not in served_by, "both replicas take traffic"
    # Each replica's own metrics count what it served, under its replica label.
    after = replica_metric(cluster, "dspark_request_success_total")
    assert set(after) == served_by
    per_replica = {tag: sum(r.replica == tag for r in results) for tag in served_by}
    assert {tag: after[tag] - before.get(tag, 0.0) for tag in after} == per_replica


def test_openai_sdk_unchanged(cluster: LocalCluster, expected: list[str]) -> None:
    base = cluster.url("/v1")
    sync = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0)
    (model,) = [m.id for m in sync.models.list()]
    messages: Any = [{"role": "user", "content": QUESTIONS[0]}]
    reply = sync.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                         temperature=0)
    assert reply.choices[0].message.content == expected[0]
    stream = sync.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[0]
    assert chunks[-1].usage is not None and reply.usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    async def run_async() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base, api_key=API_KEY, max_retries=0)
        replies = await asyncio.gather(*(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=24,
                temperature=0)
            for q in QUESTIONS[:4]))
        return [r.choices[0].message.content or "" for r in replies]

    assert asyncio.run(run_async()) == expected[:4]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()


BAD_REQUESTS: list[tuple[str, dict[str, str], dict[str, Any]]] = [
    ("no key", {}, chat("hi")),
    ("wrong key", {"Authorization": "Bearer nope"}, chat("hi")),
    ("unknown model", {}, {**chat("hi"), "model": "no-such-model"}),
    ("bad field", {}, {**chat("hi"), "max_tokens": -1}),
    ("no messages", {}, {"max_tokens": 4}),
    ("too long", {}, chat("word " * 600)),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_errors_equal_single_process(
    cluster: LocalCluster, single: str, case: tuple[str, dict[str, str], dict[str, Any]]
) -> None:
    name, headers, body = case
    if name not in ("no key", "wrong key"):
        headers = {"Authorization": f"Bearer {API_KEY}"}
    answers = [httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30)
               for base in (cluster.base_url, single)]
    ray_answer, single_answer = answers
    assert ray_answer.status_code == single_answer.status_code >= 400
    assert ray_answer.json() == single_answer.json()
    assert set(ray_answer.json()["error"]) >= {"message", "type", "param", "code"}


def test_a_full_replica_answers_429_itself(cluster: LocalCluster) -> None:
    """40 long streams at once: Serve hands each replica at most capacity + headroom (24), so
    each gets at least 16, and each engine admits exactly its capacity, 16: 8 requests get the
    engine's own 429, OpenAI-shaped with Retry-After; the admitted ones are then dropped."""

    async def run() -> list[tuple[int, str | None, dict[str, Any] | None]]:
        async with async_client(cluster.base_url) as client:
            async def one(i: int) -> tuple[int, str | None, dict[str, Any] | None]:
                body = {**chat(QUESTIONS[i % 16], max_tokens=400, ignore_eos=True),
                        "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code == 200:
                        await asyncio.sleep(3)  # hold the slot while the others arrive
                        return 200, None, None
                    await r.aread()
                    return r.status_code, r.headers.get("retry-after"), r.json()

            return list(await asyncio.gather(*(one(i) for i in range(40))))

    answers = asyncio.run(run())
    refused = [a for a in answers if a[0] != 200]
    assert len(refused) == 8, [a[0] for a in answers]
    for status, retry_after, body in refused:
        assert status == 429 and retry_after is not None and body is not None
        assert body["error"]["type"] and body["error"]["code"]
    # The admitted streams were closed by the client: their engines are empty again.
    wait_until(lambda: sum(replica_metric(cluster, "dspark_num_requests_running").values()) == 0,
               30, "aborted streams to leave the engines")


def test_prometheus_sees_every_replica_next_to_ray_serve(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """The shipped Prometheus config's two cluster jobs, run by a real Prometheus with only the
    compose host names swapped for this head's addresses (and 1 s intervals): every replica's
    dspark_* series arrive labelled by replica, and the same replica tags label Ray Serve's own
    per-replica series."""
    _, prometheus = ensure_prometheus_tools()
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    replicas_job, ray_job = jobs["dspark-replicas"], jobs["ray"]
    (sd,) = replicas_job["http_sd_configs"]
    assert sd["url"] == "http://ray:8000/metrics/replicas"
    assert ray_job["static_configs"][0]["targets"] == ["ray:8080"]
    sd["url"] = cluster.url("/metrics/replicas")
    sd["refresh_interval"] = "1s"
    ray_job["static_configs"][0]["targets"] = [f"127.0.0.1:{cluster.ray_metrics_port}"]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    config["scrape_configs"] = [replicas_job, ray_job]
    prom = start_prometheus(prometheus, tmp_path, "", config_text=yaml.safe_dump(config))
    tags = {t["labels"]["replica"] for t in cluster.replica_targets()}
    assert len(tags) == 2

    def replicas_of(expr: str) -> set[str]:
        return {r["metric"].get("replica", "") for r in prom.query(expr)["data"]["result"]}

    try:
        dspark = 'dspark_request_success_total{job="dspark-replicas", application="dspark"}'
        ray_own = 'ray_serve_deployment_request_counter_total{application="dspark"}'
        wait_until(lambda: replicas_of(dspark) == tags, 30, "dspark_* series of both replicas")
        wait_until(lambda: replicas_of(ray_own) >= tags, 30, "Ray Serve's per-replica series")
        assert replicas_of('up{job="dspark-replicas"} == 1') == tags
    finally:
        prom.stop()


def test_fault_one_replica_killed_mid_load(
    cluster: LocalCluster, single: str, expected: list[str]
) -> None:
    """Kill one replica's process while streams run on both: its streams end at once with
    a broken response (never a hang), the survivor's finish intact, new requests go to the
    survivor, and Ray Serve starts a replacement that serves (and is discovered) as before."""
    import ray
    import ray.serve

    bodies = [chat(q, max_tokens=48, ignore_eos=True) for q in QUESTIONS[:8]]
    # Ray's router may place all of the first 8 on one replica (it did in CI); these go in one
    # at a time, each once the one before has been placed, until the other replica has one too.
    spares = [chat(q, max_tokens=48, ignore_eos=True) for q in QUESTIONS[10:]]
    late = [chat(q, max_tokens=48, ignore_eos=True) for q in QUESTIONS[8:10]]
    reference = asyncio.run(stream_all(single, bodies + spares + late))
    assert all(r.done for r in reference)
    reference_late = reference[len(bodies) + len(spares):]

    running: list[bool] = []  # per stream of `first`: still streaming when the kill was sent

    async def run() -> tuple[str, list[StreamResult], list[StreamResult]]:
        loop = asyncio.get_running_loop()
        async with async_client(cluster.base_url) as client:
            first = [StreamResult(status=0, replica=None) for _ in bodies]
            tasks = [asyncio.create_task(stream_chat(client, b, r)) for b, r in zip(bodies, first)]
            deadline = loop.time() + 60
            while any(r.status == 0 for r in first):
                assert loop.time() < deadline, "the first streams were not placed"
                await asyncio.sleep(0.05)
            for body in spares:
                if len({r.replica for r in first}) == 2:
                    break
                first.append(StreamResult(status=0, replica=None))
                tasks.append(asyncio.create_task(stream_chat(client, body, first[-1])))
                while first[-1].status == 0:
                    assert loop.time() < deadline, "a spare stream was not placed"
                    await asyncio.sleep(0.05)
            # Both replicas have sent some text to a client; the victim is mid-stream.
            while len({r.replica for r in first if r.text}) < 2:
                assert loop.time() < deadline, "streams did not start on both replicas"
                await asyncio.sleep(0.05)
            victim = next(r.replica for r in first if r.text and not r.done)
            assert victim is not None
            running.extend(not r.done for r in first)
            (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].endswith(f"#{victim}")]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            await asyncio.sleep(0.5)
            second = [asyncio.create_task(stream_chat(client, b)) for b in late]
            done = await asyncio.wait_for(asyncio.gather(*tasks, *second), timeout=120)
            return victim, done[: len(first)], done[len(first):]

    victim, first, second = asyncio.run(run())
    on_victim = [r for r, live in zip(first, running) if r.replica == victim and live]
    on_survivor = [(r, ref) for r, ref in zip(first, reference) if r.replica != victim]
    assert on_victim and on_survivor
    for r in on_victim:  # cut off: an incomplete body, no [DONE], a transport error
        assert not r.done and r.error is not None, r
    for r, ref in on_survivor:
        assert r.done and r.error is None and r.text == ref.text
    for r, ref in zip(second, reference_late):
        assert r.status == 200 and r.replica != victim and r.done and r.text == ref.text

    # Ray Serve replaces the replica; the replacement loads the model, passes its first
    # health check, registers its metrics, and serves the same greedy text.
    wait_until(lambda: cluster.running_replicas() == 2, 180, "the replacement replica")
    survivor = on_survivor[0][0].replica
    tags = {t["labels"]["replica"] for t in cluster.replica_targets()}
    (replacement,) = tags - {victim, survivor}
    for _ in range(20):  # two at once: the router spreads them over both idle replicas
        pair = asyncio.run(stream_all(cluster.base_url, [chat(QUESTIONS[0])] * 2))
        hit = next((r for r in pair if r.replica == replacement), None)
        if hit is not None:
            break
    assert hit is not None, "the replacement never took traffic"
    assert hit.done and hit.text == expected[0]
    assert ray.serve.status().applications[APP_NAME].status == "RUNNING"
