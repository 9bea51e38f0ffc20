"""The workers' link codec (sans-I/O) and the hot-path shortcuts that must equal the slow path:
``Content-Location`` without re-quoting, and metrics summed over workers."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from dataapi.http_server import Request
from dataapi.ipc import MAX_FRAME, Decoder, FrameError, encode
from dataapi.metrics import DataAPIMetrics
from dataapi.server import content_location_query
from dataapi.worker import registry_samples
from dataapi.workers import sum_families

messages = st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=20),
                                                                   st.lists(st.text(max_size=5), max_size=3)),
                                    max_size=4), min_size=1, max_size=5)


@given(messages, st.data())
@settings(max_examples=200, deadline=None)
def test_frames_survive_any_split(batch: list[dict], data: st.DataObject) -> None:
    wire = b"".join(encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder, out, at = Decoder(), [], 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[at:cut])
        at = cut
    assert out == batch


def test_bad_frames_are_refused() -> None:
    with pytest.raises(FrameError, match="limit"):
        Decoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="not JSON"):
        Decoder().feed(b"\0\0\0\2{x")
    with pytest.raises(FrameError, match="not a JSON object"):
        Decoder().feed(b"\0\0\0\2[]")


@given(st.text(alphabet="ab1_.-~=&+%/ é", max_size=16))
@settings(max_examples=500, deadline=None)
def test_content_location_query_equals_decoding_and_quoting(query: str) -> None:
    target = "/main/postgres/rest/v1/t?" + quote(query, safe="=&+%~")
    reference = make_mocked_request("GET", target)  # aiohttp's reading of the same target
    slow = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(reference.query.items()))
    request = Request("GET", "1.1", target.encode(), (), b"", False, True)
    assert content_location_query(request) == slow


def test_metrics_sum_sample_by_sample() -> None:
    one, two = DataAPIMetrics(CollectorRegistry()), DataAPIMetrics(CollectorRegistry())
    for seconds in (0.001, 0.003, 0.2):
        one.observe("main", "GET", 200, seconds)
    two.observe("main", "GET", 200, 0.004)
    two.observe("main", "POST", 201, 40)
    shapes = [(f.name, f.documentation, f.type) for f in DataAPIMetrics(CollectorRegistry()).registry.collect()]
    summed = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in sum_families(shapes, [registry_samples(one.registry), registry_samples(two.registry)])
              for s in f.samples}
    get = (("branch", "main"), ("method", "GET"), ("status", "200"))
    assert summed[("lakelet_data_api_requests_total", get)] == 4
    assert summed[("lakelet_data_api_requests_total", (("branch", "main"), ("method", "POST"), ("status", "201")))] == 1
    assert summed[("lakelet_data_api_request_seconds_bucket", (("branch", "main"), ("le", "0.002")))] == 1
    assert summed[("lakelet_data_api_request_seconds_bucket", (("branch", "main"), ("le", "0.005")))] == 3
    assert summed[("lakelet_data_api_request_seconds_bucket", (("branch", "main"), ("le", "30.0")))] == 4
    assert summed[("lakelet_data_api_request_seconds_bucket", (("branch", "main"), ("le", "+Inf")))] == 5
    assert summed[("lakelet_data_api_request_seconds_count", (("branch", "main"),))] == 5
    assert abs(summed[("lakelet_data_api_request_seconds_sum", (("branch", "main"),))] - 40.208) < 1e-9
