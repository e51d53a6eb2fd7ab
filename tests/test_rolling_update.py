"""A zero-loss rolling update through a real load balancer (bench/rolling.py): HAProxy
health-checks /readyz on two replicas on loopback; under steady load one replica (two workers
under the supervisor) gets SIGTERM, drains, exits and is started again. No request may fail.

HAProxy runs in TCP mode, as a Kubernetes Service does (kube-proxy is layer 4): a client's
kept-alive connection stays on the replica that is going away, so only the server's own drain
(Connection: close while /readyz says 503) moves it. Without the drain the same run lost
requests (docs/capacity.md).

Bounded: 100 req/s for about 10 s. HAProxy comes from Debian (scripts/setup.sh installs it).
"""

from __future__ import annotations

import json

import pytest

from bench.rolling import haproxy_path, run


@pytest.mark.slow
@pytest.mark.load_balancer
def test_rolling_update_through_haproxy_loses_no_request(tmp_path, tiny_model_path, make_png):
    if haproxy_path() is None:
        pytest.fail("haproxy not found: apt-get install haproxy (scripts/setup.sh installs it)")
    result = run(tiny_model_path, tmp_path, make_png(5), drain_delay_s=2.0, mode="tcp", rate=100.0)
    print(json.dumps({k: v for k, v in result.items() if k != "goodput_bins_req_s"}, indent=2))
    assert result["failed"] == 0, result["outcomes"]
    assert result["requests"] >= 300  # the load really ran through the whole update
    # Both replicas had clients before the update; B carried them all while A was away.
    assert result["served_by_a_before"] > 0 and result["served_by_b_total"] > 0
    events = result["events_s"]
    assert events["sigterm"] < events["haproxy_down"] < events["exited"] < events["haproxy_up"]
