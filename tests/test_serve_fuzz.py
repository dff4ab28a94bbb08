"""The serve API's query bodies under fuzzing (hypothesis) against the real server: any
JSON body, query string or filter is answered 200 with hits, or a 4xx whose body is one
message ``{"detail": "..."}``; never a 500, never a dropped connection. Bounded in
examples (the server is a real uvicorn process over the session's test indexes)."""

from __future__ import annotations

import math
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, 3, 9, 24, 2**63, -1, 1e308, -1e308, 0.5]),
)
TEXTS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["a dog", "", " ", "a red square", "x" * 600, "<script>", "\x00"]),
)
WHERES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "camera = 'front'",
            "night = TRUE AND image_id < 12",
            "path LIKE '%0.jpg'",
            "image_id = 99999999999999999999999",
            "(" * 100 + "night" + ")" * 100,
            "camera LIKE 3",
        ]
    ),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "index": st.one_of(st.sampled_from(["vectors", "dense", "nope"]), SCALARS),
    "top": st.one_of(st.integers(-5, 1200), SCALARS),
    "where": st.one_of(WHERES, SCALARS),
    "positive": st.one_of(st.lists(TEXTS, max_size=4), SCALARS),
    "negative": st.one_of(st.lists(TEXTS, max_size=3), SCALARS),
    "weights": st.one_of(st.lists(NUMBERS, max_size=4), SCALARS),
    "negative_weight": st.one_of(NUMBERS, SCALARS),
    "image_id": st.one_of(st.integers(-3, 30), NUMBERS, SCALARS),
    "rep_index": st.one_of(st.integers(-2, 20), SCALARS),
    "box": st.one_of(st.lists(st.one_of(st.floats(-0.5, 1.5), NUMBERS), max_size=5), SCALARS),
    "colour": SCALARS,
}
BODIES = st.fixed_dictionaries({}, optional=dict(VALUES.items())) | st.one_of(
    st.lists(SCALARS, max_size=3), SCALARS
)


def check(response: httpx.Response) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert isinstance(body["hits"], list)
        assert all(math.isfinite(h["score"]) for h in body["hits"])
    else:
        assert isinstance(body["detail"], str)
        assert body["detail"]


@FUZZ
@given(body=BODIES)
def test_any_json_body_is_answered_or_refused_with_one_message(served_index: str, body) -> None:
    """POST /api/search with any JSON value: hits (finite scores) or one 4xx message."""
    check(httpx.post(f"{served_index}/api/search", json=body, timeout=120))


@FUZZ
@given(q=TEXTS, top=st.one_of(st.integers(-5, 1200), TEXTS), where=st.one_of(st.none(), WHERES))
def test_any_text_query_is_answered_or_refused_with_one_message(
    served_index: str, q: str, top: Any, where: str | None
) -> None:
    """GET /api/search with any q, top and where: hits or one 4xx message."""
    params = {"q": q, "top": top, "index": "vectors"} | ({"where": where} if where else {})
    check(httpx.get(f"{served_index}/api/search", params=params, timeout=120))
