"""The local Ray instance the jobs start (vpo_ray.ray_utils): what its workers are set up with."""
from __future__ import annotations


def test_ray_trains_cleaner_finds_this_instance_beside_others(ray_session):
    """Ray Train's placement-group cleaner polls the state API from a worker. With several Ray
    instances on the machine (parallel test runs, a shared host) an unset address raised
    ConnectionError and ended its thread with a traceback in the log; it must get an answer
    or the RayStateApiException it handles (no dashboard here)."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def cleaner_poll(actor_id: str) -> str:
        import os

        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException

        try:
            return f"answered {is_actor_alive(actor_id, timeout=10)} via {os.environ.get('RAY_ADDRESS')}"
        except RayStateApiException:
            return f"handled via {os.environ.get('RAY_ADDRESS')}"

    idle = Idle.remote()
    assert ray.get(idle.ping.remote())
    got = ray.get(cleaner_poll.remote(idle._actor_id.hex()))
    assert got.startswith(("answered True", "handled")), got
    assert got.endswith(f"via {ray.get_runtime_context().gcs_address}"), got
