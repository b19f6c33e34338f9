"""List pages and Export chunks are bounded by bytes as well as rows.

A server with a small message limit holds rows that are large next to it: a List page of
them comes back with fewer rows than asked for and a token that continues right after the
last one, so a walk sees every row exactly once; a row larger than the byte budget still
goes, alone; an export of large predictions never sends a message over the limit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import Message

from ferrule.v1 import analysis_service_pb2 as apb
from ferrule.v1 import prediction_service_pb2 as ppb
from ferrule.v1 import user_service_pb2 as upb
from server.listing import element_size, response_byte_budget
from tests.server.conftest import RunningServer, StartServer

#: Small enough that a handful of rows outgrows one message, large enough for one big row.
MAX_MESSAGE_BYTES = 160 * 1024
BUDGET = response_byte_budget(MAX_MESSAGE_BYTES)


@pytest.fixture
async def small_messages(start_server: StartServer, database_url: str) -> RunningServer:
    return await start_server(database_url, ferrule_max_message_bytes=MAX_MESSAGE_BYTES)


async def new_org(server: RunningServer) -> str:
    org = await server.admin().users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="bytes"))
    )
    return org.name


def text_of(size: int, seed: int) -> str:
    """Distinct texts (equal ones would be deduplicated to one analysis)."""
    return (f"row {seed:04d} " * (size // 9 + 1))[:size]


def rows_bytes(messages: list[Message]) -> int:
    return sum(element_size(message) for message in messages)


def assert_within_budget(messages: list[Message]) -> None:
    """Within the budget, or one row on its own (one larger than the budget)."""
    assert len(messages) == 1 or rows_bytes(messages) <= BUDGET, [m.ByteSize() for m in messages]


async def test_a_page_of_large_analyses_stops_at_the_budget_and_the_walk_sees_each_once(
    small_messages: RunningServer,
) -> None:
    parent = await new_org(small_messages)
    client = small_messages.admin()
    sizes = [30_000] * 4 + [100_000] + [30_000] * 4  # one row alone exceeds the budget
    assert BUDGET < 100_000 and MAX_MESSAGE_BYTES - 1024 > 100_000
    assert sum(sizes) > MAX_MESSAGE_BYTES  # one page of all of them could not be sent
    created = []
    for seed, size in enumerate(sizes):
        created.append(
            await client.analyses.CreateAnalysis(
                apb.CreateAnalysisRequest(
                    parent=parent,
                    analysis=apb.Analysis(
                        text=text_of(size, seed), analysis_type=apb.ANALYSIS_TYPE_SENTIMENT
                    ),
                )
            )
        )

    seen: list[str] = []
    pages: list[list[apb.Analysis]] = []
    token = ""
    for _ in range(len(sizes) + 1):  # a walk that does not end is a failure, not a hang
        page = await client.analyses.ListAnalyses(
            apb.ListAnalysesRequest(parent=parent, page_size=50, page_token=token)
        )
        assert page.ByteSize() <= MAX_MESSAGE_BYTES
        assert page.total_size == len(sizes)
        assert page.analyses, "a page with a next_page_token is never empty"
        assert_within_budget(list(page.analyses))
        pages.append(list(page.analyses))
        seen += [a.name for a in page.analyses]
        token = page.next_page_token
        if not token:
            break
    assert not token, "the walk did not end"
    assert sorted(seen) == sorted(a.name for a in created)
    assert len(seen) == len(set(seen)), "a row was sent twice"
    assert len(pages) > 1
    assert any(len(p) > 1 for p in pages), "rows under the budget share a page"
    (alone,) = [p for p in pages if any(len(a.text) == 100_000 for a in p)]
    assert len(alone) == 1, "the row over the budget goes on its own"


def features_of(size: int, seed: int) -> ppb.Prediction:
    prediction = ppb.Prediction(
        subject_id=f"emp-{seed}", probability=0.5, model_name="m", model_version="v1"
    )
    prediction.features.update({"seed": seed, "notes": "f" * size})
    return prediction


async def large_predictions(server: RunningServer, parent: str, count: int) -> set[str]:
    """``count`` predictions with ~40 KB of features each: a default chunk or page of
    them is several times the message limit."""
    created = set()
    for seed in range(count):
        made = await server.admin().predictions.CreatePrediction(
            ppb.CreatePredictionRequest(parent=parent, prediction=features_of(40_000, seed))
        )
        created.add(made.name)
    return created


async def test_export_with_large_features_never_exceeds_the_message_limit(
    small_messages: RunningServer,
) -> None:
    parent = await new_org(small_messages)
    created = await large_predictions(small_messages, parent, 12)
    exported: list[str] = []
    messages = 0
    async for chunk in small_messages.admin().predictions.ExportPredictions(
        ppb.ExportPredictionsRequest(parent=parent, chunk_size=1000)
    ):
        messages += 1
        assert chunk.ByteSize() <= MAX_MESSAGE_BYTES
        assert_within_budget(list(chunk.predictions))
        exported += [p.name for p in chunk.predictions]
    assert sorted(exported) == sorted(created)
    assert len(exported) == len(set(exported))
    assert messages >= (12 * 40_000) // BUDGET


async def test_every_list_rpc_pages_by_bytes_through_the_same_helper(
    small_messages: RunningServer,
) -> None:
    """ListPredictions (another service) walks the same large rows page by page."""
    parent = await new_org(small_messages)
    created = await large_predictions(small_messages, parent, 12)
    listed: list[str] = []
    token = ""
    for _ in range(len(created) + 1):
        page = await small_messages.admin().predictions.ListPredictions(
            ppb.ListPredictionsRequest(parent=parent, page_size=1000, page_token=token)
        )
        assert page.predictions
        assert_within_budget(list(page.predictions))
        listed += [p.name for p in page.predictions]
        token = page.next_page_token
        if not token:
            break
    assert not token, "the walk did not end"
    assert sorted(listed) == sorted(created)
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize(
    ("sizes", "groups"),
    [
        ([10, 10, 10], [[10, 10, 10]]),
        ([60, 60], [[60], [60]]),
        ([500, 10, 10], [[500], [10, 10]]),  # larger than the budget: alone
        ([10, 500, 10], [[10], [500], [10]]),
        ([], []),
    ],
)
def test_rows_are_grouped_within_the_budget_in_order(
    sizes: list[int], groups: list[list[int]]
) -> None:
    from server.listing import fill_within

    def convert(size: int) -> upb.Organization:
        return upb.Organization(name="x" * size)

    size_of: Callable[[upb.Organization], int] = lambda o: len(o.name)  # noqa: E731
    budget = element_size(convert(60)) + element_size(convert(10))
    got = [[size_of(m) for m in group] for group in fill_within(sizes, convert, budget)]
    assert got == groups
