"""`python -m server.cluster`'s flags and the Ray Serve options they become (no Ray session)."""

from __future__ import annotations

import asyncio

import pytest

from server.cluster import (
    ADMISSION_HEADROOM,
    DEPLOYMENT_NAME,
    DSparkReplica,
    args_to_argv,
    build_app,
    deployment_options,
    parse_cluster_args,
)


def test_defaults_and_the_issue_command() -> None:
    settings, options = parse_cluster_args(["--replicas", "2", "--threads-per-replica", "1"],
                                           env={})
    assert (options.replicas, options.max_replicas, options.threads_per_replica) == (2, 0, 1)
    assert settings.threads == 1  # the engine's torch threads are what Ray reserved
    assert settings.engine_process  # one engine core process per replica, as python -m server
    opts = deployment_options(settings, options)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_server_and_engine_flags_reach_every_replica() -> None:
    settings, _ = parse_cluster_args(
        ["--api-key", "k", "--max-queue", "3", "--speculative", "none", "--max-num-seqs", "4"],
        env={},
    )
    assert settings.api_key == "k" and settings.max_queue == 3
    assert (settings.engine.speculative, settings.engine.max_num_seqs) == ("none", 4)


def test_environment_twins() -> None:
    env = {"DSPARK_REPLICAS": "3", "DSPARK_THREADS_PER_REPLICA": "2", "DSPARK_MAX_QUEUE": "5"}
    settings, options = parse_cluster_args([], env=env)
    assert (options.replicas, options.threads_per_replica, settings.max_queue) == (3, 2, 5)
    _, options = parse_cluster_args(["--replicas", "4"], env=env)
    assert options.replicas == 4  # a flag wins over its environment twin


def test_autoscaling_on_ongoing_requests_per_replica() -> None:
    settings, options = parse_cluster_args(
        ["--min-replicas", "1", "--max-replicas", "4", "--max-num-seqs", "8"], env={})
    opts = deployment_options(settings, options)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    _, options = parse_cluster_args(
        ["--max-replicas", "4", "--target-ongoing-requests", "2.5"], env={})
    assert deployment_options(settings, options)["autoscaling_config"][
        "target_ongoing_requests"] == 2.5


def test_serve_sends_a_replica_more_than_its_engine_holds_so_the_engine_answers_429() -> None:
    settings, options = parse_cluster_args(["--max-num-seqs", "8", "--max-queue", "8"], env={})
    capacity = 8 + 8
    assert deployment_options(settings, options)["max_ongoing_requests"] == (
        capacity + ADMISSION_HEADROOM)


@pytest.mark.parametrize(
    "argv",
    [["--replicas", "0"], ["--min-replicas", "3", "--max-replicas", "2"],
     ["--threads-per-replica", "0"], ["--object-store-mb", "10"], ["--replicas", "two"]],
)
def test_bad_flags_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_cluster_args(argv, env={})
    assert exc.value.code == 2
    assert "usage: python -m server.cluster" in capsys.readouterr().err


def test_serve_run_args_become_flags() -> None:
    assert args_to_argv({"max_replicas": 4, "warmup": False, "log_prompts": True}) == [
        "--max-replicas", "4", "--no-warmup", "--log-prompts"]
    # `serve run server.cluster:build_app warmup=false replicas=2` passes strings.
    assert args_to_argv({"warmup": "false", "replicas": "2"}) == [
        "--no-warmup", "--replicas", "2"]


def test_build_app_is_the_same_deployment() -> None:
    app = build_app({"replicas": 3, "threads_per_replica": 2, "gpus_per_replica": 1})
    deployment = app._bound_deployment  # Serve has no public reader for the bound options
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 1.0}


def test_health_check_waits_for_the_model_then_fails_once_the_engine_died() -> None:
    """Serve sends a replica traffic only after its first check_health passes, and replaces a
    replica whose check fails: the first check must wait out the load, and a dead engine (the
    app's `fatal`) must fail it."""
    from types import SimpleNamespace

    check_health = DSparkReplica.func_or_class.check_health
    state = SimpleNamespace(ready=False, fatal=None)
    replica = SimpleNamespace(_state=state)  # what check_health reads of the replica

    async def load_then_check() -> None:
        check = asyncio.create_task(check_health(replica))
        await asyncio.sleep(0.3)
        assert not check.done()  # still loading: no traffic yet
        state.ready = True
        await asyncio.wait_for(check, 1.0)
        await check_health(replica)  # a healthy replica answers at once
        state.fatal = "engine died"
        with pytest.raises(RuntimeError, match="engine died"):
            await check_health(replica)

    asyncio.run(load_then_check())
    failed_load = SimpleNamespace(_state=SimpleNamespace(ready=False, fatal="startup failed"))
    with pytest.raises(RuntimeError, match="startup failed"):
        asyncio.run(asyncio.wait_for(check_health(failed_load), 1.0))
