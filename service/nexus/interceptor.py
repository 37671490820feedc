"""The server interceptor every RPC passes through.

For each call it: authenticates the bearer token (health and reflection are
public), makes the caller's deadline visible to the database layer, turns any
error into a google.rpc.Status with rich details (errors.to_status, the one
mapping), and writes one structured log line plus metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from nexus import errors, validation
from nexus.auth import Authenticator, Principal, current_principal
from nexus.database import call_deadline
from nexus.metrics import RPC_CALLS, RPC_LATENCY

log = logging.getLogger("nexus.rpc")

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class RpcInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        public = method.startswith(PUBLIC_PREFIXES)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(method, public, handler.unary_unary),
                request_deserializer=_decoder(method, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            # Server streams here are coroutines that send with context.write()
            # (grpc's health Watch), so the same guard wraps them.
            return grpc.unary_stream_rpc_method_handler(
                self._guard(method, public, handler.unary_stream),
                request_deserializer=_decoder(method, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # reflection's bidirectional stream: public, passed through

    def _guard(self, method: str, public: bool, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _RpcScope(self._authenticator, method, public, context):
                if isinstance(request, errors.InvalidArgument):  # from _decoder
                    raise request
                return await behavior(request, context)

        return handle


def _decoder(method: str, deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """The request deserializer, except that a request it cannot decode becomes
    the InvalidArgument the guard raises (after authentication), where grpc
    would answer UNKNOWN with the decoder's internal message."""

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return validation.undecodable_request(method, deserialize, data)

    return decode


class _RpcScope:
    """One call's bookkeeping: authenticate and set the deadline on entry;
    on exit turn an error into a status, then log and count the call."""

    __slots__ = ("_authenticator", "_method", "_public", "_context", "_started", "_principal")

    def __init__(self, authenticator: Authenticator, method: str, public: bool, context: grpc.aio.ServicerContext) -> None:
        self._authenticator = authenticator
        self._method = method
        self._public = public
        self._context = context
        self._principal: Principal | None = None

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()
        remaining = self._context.time_remaining()
        if remaining is not None:
            call_deadline.set(time.monotonic() + remaining)
        if not self._public:
            try:
                self._principal = self._authenticator.authenticate(_authorization(self._context))
            except errors.NexusError as exc:
                await self.__aexit__(type(exc), exc, None)
            current_principal.set(self._principal)  # type: ignore[arg-type]

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        code = grpc.StatusCode.OK
        try:
            if exc is not None:
                code, status = _failure(self._method, exc)
                if status is not None:
                    await self._context.abort_with_status(status)
        finally:
            _observe(self._method, code, time.perf_counter() - self._started, self._principal)


def _failure(method: str, exc: BaseException) -> tuple[grpc.StatusCode, grpc.Status | None]:
    """The status code to record, and the status to send (None: let it propagate)."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN, None
    if not isinstance(exc, errors.NexusError):
        log.exception("event=rpc_internal_error method=%s", method)
        exc = errors.NexusError()
    return exc.code, errors.to_status(exc)


@functools.cache
def _call_counter(method: str, code: grpc.StatusCode) -> Any:
    return RPC_CALLS.labels(method, code.name)


@functools.cache
def _latency_histogram(method: str) -> Any:
    return RPC_LATENCY.labels(method)


def _observe(method: str, code: grpc.StatusCode, elapsed: float, principal: Principal | None) -> None:
    _call_counter(method, code).inc()
    _latency_histogram(method).observe(elapsed)
    if log.isEnabledFor(logging.INFO):
        user = principal.subject if principal else "-"
        service = principal.is_service if principal else False
        log.info(
            "event=rpc method=%s code=%s duration_ms=%.2f user=%s service=%s",
            method, code.name, elapsed * 1000, user, service,
        )
