"""Scopes of plain calls run in one wrapper exactly as if each wrapped the next: entered
in order, exited in reverse, each exit seeing the exception that reaches it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from server.interceptors.chain import InterceptorChain
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
    wrap_handler_scopes,
)

Text = wrappers_pb2.StringValue


class Boom(Exception):
    pass


class Replaced(Exception):
    pass


class Recorded(ScopeContextManager):
    def __init__(
        self, label: str, events: list[str], *, fail_on_enter: bool = False, replace: bool = False
    ) -> None:
        self.label = label
        self.events = events
        self.fail_on_enter = fail_on_enter
        self.replace = replace

    def enter(self) -> None:
        self.events.append(f"enter {self.label}")
        if self.fail_on_enter:
            raise Boom(self.label)

    def exit(self, exc: BaseException | None) -> None:
        self.events.append(f"exit {self.label} {type(exc).__name__ if exc else '-'}")
        if self.replace and exc is not None:
            raise Replaced(self.label)


def scopes(events: list[str], **options: dict[str, Any]) -> list[SyncScopeFactory]:
    def factory(label: str) -> SyncScopeFactory:
        return lambda context, request: Recorded(label, events, **options.get(label, {}))

    return [factory(label) for label in ("outer", "middle", "inner")]


async def echo(request: Text, context: Context) -> Text:
    return Text(value="echo:" + request.value)


async def fails(request: Text, context: Context) -> Text:
    raise Boom("behaviour")


def unary(behaviour: Any) -> Handler:
    return grpc.unary_unary_rpc_method_handler(behaviour)


async def call(handler: Handler, value: str) -> Any:
    """The handler's behaviour, called as grpc.aio would (no scope here reads the context)."""
    behaviour: Any = handler.unary_unary
    return await behaviour(Text(value=value), None)


async def test_scopes_enter_in_order_and_exit_in_reverse_around_the_behaviour() -> None:
    events: list[str] = []
    handler = wrap_handler_scopes(unary(echo), scopes(events))
    assert await call(handler, "a") == Text(value="echo:a")
    assert events == [
        "enter outer",
        "enter middle",
        "enter inner",
        "exit inner -",
        "exit middle -",
        "exit outer -",
    ]


async def test_every_scope_sees_the_behaviours_exception_which_leaves_unchanged() -> None:
    events: list[str] = []
    handler = wrap_handler_scopes(unary(fails), scopes(events))
    with pytest.raises(Boom, match="behaviour"):
        await call(handler, "a")
    assert events[3:] == ["exit inner Boom", "exit middle Boom", "exit outer Boom"]


async def test_an_exception_raised_by_an_exit_is_what_the_outer_scopes_see() -> None:
    events: list[str] = []
    handler = wrap_handler_scopes(unary(fails), scopes(events, middle={"replace": True}))
    with pytest.raises(Replaced) as raised:
        await call(handler, "a")
    assert events[3:] == ["exit inner Boom", "exit middle Boom", "exit outer Replaced"]
    assert isinstance(raised.value.__context__, Boom)


async def test_a_scope_that_fails_to_enter_is_not_exited_nor_are_those_inside_it() -> None:
    events: list[str] = []
    handler = wrap_handler_scopes(unary(echo), scopes(events, middle={"fail_on_enter": True}))
    with pytest.raises(Boom, match="middle"):
        await call(handler, "a")
    assert events == ["enter outer", "enter middle", "exit outer Boom"]


class Labelled(SyncScopedInterceptor):
    def __init__(self, label: str, events: list[str]) -> None:
        self.label = label
        self.events = events

    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory:
        return lambda context, request: Recorded(self.label, self.events)


async def test_a_chain_runs_neighbouring_scopes_in_one_wrapper_as_nested_ones() -> None:
    events: list[str] = []
    chain = InterceptorChain([Labelled("a", events), Labelled("b", events)])

    async def handlers(details: grpc.HandlerCallDetails) -> Handler | None:
        return unary(echo)

    class Details(grpc.HandlerCallDetails):
        method = "/chain.Echo/Echo"
        invocation_metadata = ()

    handler = await chain.intercept_service(handlers, Details())
    assert handler is not None
    assert await call(handler, "x") == Text(value="echo:x")
    assert events == ["enter a", "enter b", "exit b -", "exit a -"]
    alone = await Labelled("c", events).intercept_service(handlers, Details())
    assert alone is not None
    events.clear()
    assert await call(alone, "y") == Text(value="echo:y")
    assert events == ["enter c", "exit c -"]


class Settled(Exception):
    pass


class Settles(Recorded):
    """Settles an Exception that reaches it by replacing it, after awaiting (as error
    mapping awaits sending the status)."""

    settles = True

    async def settle(self, exc: Exception) -> None:
        await asyncio.sleep(0)
        self.events.append(f"settle {self.label} {type(exc).__name__}")
        raise Settled(self.label)


def settling(events: list[str]) -> list[SyncScopeFactory]:
    return [
        lambda context, request: Recorded("outer", events),
        lambda context, request: Settles("middle", events),
        lambda context, request: Recorded("inner", events),
    ]


async def test_a_settling_scope_replaces_the_exception_for_the_scopes_outside_it() -> None:
    events: list[str] = []
    handler = wrap_handler_scopes(unary(fails), settling(events))
    with pytest.raises(Settled) as raised:
        await call(handler, "a")
    assert events[3:] == [
        "exit inner Boom",
        "settle middle Boom",
        "exit middle Settled",
        "exit outer Settled",
    ]
    assert isinstance(raised.value.__context__, Boom)


async def test_a_settling_scope_is_not_asked_about_success_nor_a_cancellation() -> None:
    events: list[str] = []
    handler = wrap_handler_scopes(unary(echo), settling(events))
    assert await call(handler, "a") == Text(value="echo:a")
    assert events[3:] == ["exit inner -", "exit middle -", "exit outer -"]

    async def cancelled(request: Text, context: Context) -> Text:
        raise asyncio.CancelledError

    events.clear()
    handler = wrap_handler_scopes(unary(cancelled), settling(events))
    with pytest.raises(asyncio.CancelledError):
        await call(handler, "a")
    assert events[3:] == [
        "exit inner CancelledError",
        "exit middle CancelledError",
        "exit outer CancelledError",
    ]


async def test_a_settling_scope_as_an_async_context_manager_settles_alike() -> None:
    events: list[str] = []
    with pytest.raises(Settled):
        async with Settles("alone", events):
            raise Boom("inside")
    assert events == ["enter alone", "settle alone Boom", "exit alone Settled"]
