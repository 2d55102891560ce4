"""`deps.query_options` parses a query string as FastAPI's own query model would: same values,
same 422s (status, `loc`, error type), and the same OpenAPI parameters."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from pipeline.serving.deps import QueryOptions, options_parameters
from pipeline.serving.schemas import Options


def make_apps() -> tuple[FastAPI, FastAPI]:
    ours, theirs = FastAPI(), FastAPI()

    @ours.get("/r", openapi_extra={"parameters": options_parameters()})
    async def fast(opts: QueryOptions) -> dict:
        return opts.model_dump()

    @theirs.get("/r")
    async def stock(opts: Annotated[Options, Query()]) -> dict:
        return opts.model_dump()

    return ours, theirs


QUERIES = [
    "",
    "k=25",
    "k=0",
    "k=101",
    "k=abc",
    "k=3&k=7",  # a repeated scalar: the last one
    "exclude=i1&exclude=i2&category=books",
    "exclude=",  # an empty id
    "diversity=0.5&max_per_category=2&explain=true",
    "diversity=2",
    "explain=maybe",
    "max_per_category=0",
    "nonsense=1",  # unknown parameters are refused (extra="forbid")
    "tag=a&tag=b&exclude_tag=c&exclude_category=d",
    "&".join(f"exclude=i{i}" for i in range(101)),  # over the list's limit
]


@pytest.mark.parametrize("query", QUERIES)
def test_same_answer_as_fastapis_query_model(query):
    ours, theirs = make_apps()
    a = TestClient(ours).get(f"/r?{query}")
    b = TestClient(theirs).get(f"/r?{query}")
    assert a.status_code == b.status_code, (a.text, b.text)
    if a.status_code == 200:
        assert a.json() == b.json()
    else:
        assert a.status_code == 422
        ours_errors = [(tuple(e["loc"]), e["type"]) for e in a.json()["detail"]]
        theirs_errors = [(tuple(e["loc"]), e["type"]) for e in b.json()["detail"]]
        assert sorted(ours_errors) == sorted(theirs_errors)


def test_openapi_parameters_match_fastapis():
    ours, theirs = make_apps()
    mine = ours.openapi()["paths"]["/r"]["get"]["parameters"]
    stock = theirs.openapi()["paths"]["/r"]["get"]["parameters"]
    assert [p["name"] for p in mine] == [p["name"] for p in stock]
    for m, s in zip(mine, stock, strict=True):
        assert m["in"] == s["in"] == "query" and m["required"] == s["required"]
        assert m["schema"].get("type") == s["schema"].get("type")
        for bound in ("minimum", "maximum", "maxItems", "default"):
            assert m["schema"].get(bound) == s["schema"].get(bound), (m["name"], bound)
