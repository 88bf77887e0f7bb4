"""Which executor `run.executor: auto` picks (a rule, no Ray needed), how the Ray executor sizes
its segmenting actors (`_actors` is arithmetic, no Ray needed), and where the embedded Ray it
starts listens (a real Ray)."""

from __future__ import annotations

import ipaddress

import psutil
import pytest
import ray

from sam_batch.jobs import executors, ray_pipeline
from sam_batch.jobs.executors import AUTO_RAY_MIN_IMAGES, RayExecutor, choose_executor, visible_gpus
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.ray_pipeline import STAGE_TASK_CPUS


def executor(device: str = "auto", max_actors: int | None = None, **amg) -> RayExecutor:
    return RayExecutor(
        parse_job(
            {
                "name": "sizing",
                "input": {"uris": ["x.jpg"]},
                "output": {"uri": "out"},
                "engine": {"device": device},
                "amg": amg,
                "run": {"max_actors": max_actors},
            }
        )
    )


def job(device: str = "cpu", **run):
    return parse_job(
        {
            "name": "choice",
            "input": {"uris": ["x.jpg"]},
            "output": {"uri": "out"},
            "engine": {"device": device},
            "run": run,
        }
    )


@pytest.fixture
def no_gpus(monkeypatch, tmp_path):
    """A machine without GPUs, and no cluster named in the environment."""
    monkeypatch.setattr(executors, "NVIDIA_GPUS_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def gpus_present(monkeypatch, tmp_path, count: int) -> None:
    """`count` GPUs as the NVIDIA driver lists them."""
    listed = tmp_path / "gpus"
    for i in range(count):
        (listed / f"0000:0{i}:00.0").mkdir(parents=True)
    monkeypatch.setattr(executors, "NVIDIA_GPUS_DIR", str(listed))


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda"])
def test_auto_runs_small_jobs_in_process(no_gpus, device) -> None:
    assert choose_executor(job(device), 1)[0] == "local"
    assert choose_executor(job(device), AUTO_RAY_MIN_IMAGES - 1)[0] == "local"


def test_auto_runs_large_jobs_on_ray(no_gpus) -> None:
    assert choose_executor(job(), AUTO_RAY_MIN_IMAGES) == (
        "ray",
        f"auto: {AUTO_RAY_MIN_IMAGES} images to do, at least {AUTO_RAY_MIN_IMAGES}",
    )


def test_auto_attaches_to_a_cluster_however_small_the_job(no_gpus, monkeypatch) -> None:
    assert choose_executor(job(ray_address="auto"), 1)[0] == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_executor(job(), 1)[0] == "ray"


@pytest.mark.parametrize(
    ("device", "count", "want"), [("cuda", 2, "ray"), ("auto", 2, "ray"), ("cpu", 2, "local"), ("cuda", 1, "local")]
)
def test_auto_uses_ray_for_a_gpu_job_on_several_gpus(no_gpus, monkeypatch, tmp_path, device, count, want) -> None:
    gpus_present(monkeypatch, tmp_path, count)
    assert choose_executor(job(device), 1)[0] == want


@pytest.mark.parametrize(("visible", "want"), [(None, 4), ("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0,-1,1", 1)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, tmp_path, visible, want) -> None:
    gpus_present(monkeypatch, tmp_path, 4)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == want


@pytest.mark.parametrize("named", ["ray", "local"])
def test_a_named_executor_is_kept(no_gpus, named) -> None:
    assert choose_executor(job(executor=named), 1)[0] == named
    assert choose_executor(job(executor=named, ray_address="auto"), 10 * AUTO_RAY_MIN_IMAGES)[0] == named


@pytest.mark.parametrize(
    ("cluster", "node_cpus", "n_images", "want_cpus", "want_count"),
    [
        ({"CPU": 2}, 2, 100, 2, 1),  # this machine: one actor, two batch threads
        ({"CPU": 2}, 2, 1, 2, 1),
        ({"CPU": 16}, 16, 1000, 2, 8),
        ({"CPU": 16}, 16, 3, 5, 3),  # fewer images than actors: the actors started share the cores
        ({"CPU": 32}, 16, 2, 16, 2),  # ... as far as one node holds them
        ({"CPU": 2}, 1, 100, 1, 2),  # two 1-core nodes: an actor never asks for more than a node has
        ({"CPU": 1}, 1, 5, 1, 1),
    ],
)
def test_cpu_actors_take_two_cores_each_and_share_the_rest(cluster, node_cpus, n_images, want_cpus, want_count) -> None:
    resources, count = executor()._actors(cluster, node_cpus, n_images)
    assert (resources, count) == ({"num_cpus": want_cpus - STAGE_TASK_CPUS}, want_count)


GIB = 2**30


@pytest.mark.parametrize(
    ("amg", "node_memory", "n_images", "want_cpus", "want_count"),
    [
        ({"points_per_side": 8}, 64 * GIB, 1000, 1, 16),  # 64 prompts: one batch per crop, an actor per core
        ({"points_per_side": 4, "crop_n_layers": 1}, None, 1000, 1, 16),  # deeper layers have fewer points
        ({"points_per_side": 8}, 16 * GIB, 1000, 2, 8),  # 1 GiB a core is too little for an actor each
        ({"points_per_side": 8, "points_per_batch": 32}, 64 * GIB, 1000, 2, 8),  # two batches: two threads
        ({"points_per_side": 9}, 64 * GIB, 1000, 2, 8),
        ({"points_per_side": 4}, 64 * GIB, 4, 4, 4),  # fewer images than cores: the actors share them
    ],
)
def test_one_batch_grids_take_a_core_per_actor_where_memory_allows(
    amg, node_memory, n_images, want_cpus, want_count
) -> None:
    resources, count = executor(**amg)._actors({"CPU": 16}, 16, n_images, node_memory)
    assert (resources, count) == ({"num_cpus": want_cpus - STAGE_TASK_CPUS}, want_count)


def test_a_given_actor_size_is_kept() -> None:
    sized = RayExecutor(executor(points_per_side=4).job, cpus_per_actor=2)
    assert sized._actors({"CPU": 16}, 16, 1000, None) == ({"num_cpus": 2 - STAGE_TASK_CPUS}, 8)


def test_gpu_actors_take_one_gpu_each_unless_the_job_asks_for_the_cpu() -> None:
    assert executor()._actors({"CPU": 16, "GPU": 4}, 16, 100) == ({"num_gpus": 1, "num_cpus": 1}, 4)
    assert executor()._actors({"CPU": 16, "GPU": 4}, 16, 2) == ({"num_gpus": 1, "num_cpus": 1}, 2)
    assert executor("cpu")._actors({"CPU": 16, "GPU": 4}, 16, 100)[1] == 8


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_jobs_ask_for_a_gpu_even_where_the_cluster_has_none_yet(device) -> None:
    """An autoscaler adds GPU nodes for the actors waiting for one: at least one actor asks."""
    assert executor(device)._actors({"CPU": 16}, 16, 100) == ({"num_gpus": 1, "num_cpus": 1}, 1)
    assert executor(device)._actors({"CPU": 16, "GPU": 3}, 16, 100) == ({"num_gpus": 1, "num_cpus": 1}, 3)
    assert executor("auto")._actors({"CPU": 16}, 16, 100)[0] == {"num_cpus": 2 - STAGE_TASK_CPUS}


@pytest.mark.parametrize(
    ("device", "cluster", "max_actors", "want_resources", "want_count"),
    [
        ("cuda", {"CPU": 16, "GPU": 4}, 2, {"num_gpus": 1, "num_cpus": 1}, 2),
        ("cuda", {"CPU": 16}, 3, {"num_gpus": 1, "num_cpus": 1}, 1),  # a cap, not a count: 1 with no GPU present
        ("auto", {"CPU": 16, "GPU": 4}, 8, {"num_gpus": 1, "num_cpus": 1}, 4),
        ("cpu", {"CPU": 16}, 2, {"num_cpus": 8 - STAGE_TASK_CPUS}, 2),  # the actors started share the cores
        ("cpu", {"CPU": 16}, 1, {"num_cpus": 16 - STAGE_TASK_CPUS}, 1),
        ("cpu", {"CPU": 16}, 100, {"num_cpus": 2 - STAGE_TASK_CPUS}, 8),
    ],
)
def test_max_actors_caps_the_pool(device, cluster, max_actors, want_resources, want_count) -> None:
    assert executor(device, max_actors)._actors(cluster, 16, 100) == (want_resources, want_count)


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8 and ::1, also when written as an IPv4-mapped IPv6 address."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.parametrize(
    ("resources", "threads"),
    [
        ({"num_cpus": 2 - STAGE_TASK_CPUS}, "2"),
        ({"num_cpus": 1}, "1"),
        ({"num_cpus": 5 - STAGE_TASK_CPUS}, "5"),
        ({"num_gpus": 1, "num_cpus": 1}, "1"),
    ],
)
def test_segmenting_actors_get_omp_threads_for_every_core_they_use(resources, threads) -> None:
    """Ray would set OMP_NUM_THREADS to the CPUs it assigns rounded down (1 for 1.75)."""
    assert ray_pipeline._actor_env(resources) == {"env_vars": {"OMP_NUM_THREADS": threads}}
    assert ray_pipeline._actor_threads(resources["num_cpus"]) == int(threads)


def test_embedded_ray_listens_on_loopback_only() -> None:
    embedded = executor()
    assert embedded._init_ray(ray), "a Ray was already running in this process"
    try:
        # a task starts a worker process, so that the worker's server is among those checked
        worker_address = ray.get(ray.remote(ray.util.get_node_ip_address).remote())
        nodes = {node["NodeManagerAddress"] for node in ray.nodes()}
        driver = psutil.Process()
        listening = {
            (process.name(), conn.laddr)
            for process in [driver, *driver.children(recursive=True)]
            for conn in process.net_connections("inet")
            if conn.status == psutil.CONN_LISTEN
        }
    finally:
        embedded._shutdown_ray(ray)
    assert (worker_address, nodes) == ("127.0.0.1", {"127.0.0.1"})
    assert len(listening) >= 4  # the driver, GCS, raylet and worker at least
    assert {name: addr for name, addr in listening if not is_loopback(addr.ip)} == {}
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER, "the multi-node flag is back on after the start"
