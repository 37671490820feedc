"""The server interceptor every RPC passes through.

For each call it: authenticates the bearer token (health and reflection are
public), makes the caller's deadline visible to the database layer, turns any
error into a google.rpc.Status with rich details (errors.to_status, the one
mapping), and writes one structured log line plus metrics (nexus.metrics).
A server stream ends with UNAUTHENTICATED when its token expires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from nexus import errors, validation
from nexus.auth import Authenticator, Principal, current_principal
from nexus.database import call_deadline
from nexus.metrics import MethodMetrics

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
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
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
        assert handler.request_deserializer is not None  # every registered method has one
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(method, public, MethodMetrics(method, "unary"), handler.unary_unary),
                request_deserializer=_decoder(method, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            # Server streams here are coroutines that send with context.write()
            # (grpc's health Watch), so the same guard wraps them.
            return grpc.unary_stream_rpc_method_handler(
                self._guard(method, public, MethodMetrics(method, "server_stream"), handler.unary_stream),
                request_deserializer=_decoder(method, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # reflection's bidirectional stream: public, passed through

    def _guard(
        self, method: str, public: bool, metrics: MethodMetrics, behavior: Callable[..., Any]
    ) -> Callable[..., Awaitable[Any]]:
        if not metrics.streaming:

            async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _RpcScope(self._authenticator, method, public, metrics, context):
                    _raise_if_undecodable(request)
                    return await behavior(request, context)

            return handle

        async def handle_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _RpcScope(self._authenticator, method, public, metrics, context) as principal:
                _raise_if_undecodable(request)
                # A stream outliving its token would deliver forever: it ends
                # when the token lapses, and the client reconnects with a fresh one.
                expiry = asyncio.timeout_at(_loop_time(principal.expires_at) if principal else None)
                try:
                    async with expiry:
                        return await behavior(request, _CountingContext(context, metrics.sent))
                except TimeoutError:
                    if expiry.expired():
                        raise errors.Unauthenticated("token expired: reconnect with a fresh token and resume") from None
                    raise

        return handle_stream


def _loop_time(unix_time: float) -> float | None:
    """A wall-clock instant on the event loop's clock (None: never)."""
    if unix_time == math.inf:
        return None
    return asyncio.get_running_loop().time() + (unix_time - time.time())


class _CountingContext:
    """A stream's context that counts the messages the handler writes."""

    __slots__ = ("_context", "_sent")

    def __init__(self, context: grpc.aio.ServicerContext, sent: Any) -> None:
        self._context = context
        self._sent = sent

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _raise_if_undecodable(request: Any) -> None:
    if isinstance(request, errors.InvalidArgument):  # from _decoder
        raise request


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
    """One call's bookkeeping: count it and authenticate it on entry (yielding
    the principal, None on a public method); on exit turn an error into a
    status, then log and count the call."""

    __slots__ = ("_authenticator", "_method", "_public", "_metrics", "_context", "_started", "_principal")

    def __init__(
        self,
        authenticator: Authenticator,
        method: str,
        public: bool,
        metrics: MethodMetrics,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._authenticator = authenticator
        self._method = method
        self._public = public
        self._metrics = metrics
        self._context = context
        self._principal: Principal | None = None

    async def __aenter__(self) -> Principal | None:
        self._started = time.perf_counter()
        metrics = self._metrics
        metrics.started.inc()
        metrics.received.inc()
        if metrics.streaming:
            metrics.open.inc()
        remaining = self._context.time_remaining()
        if remaining is not None:
            call_deadline.set(time.monotonic() + remaining)
        if not self._public:
            try:
                self._principal = self._authenticator.authenticate(_authorization(self._context))
            except errors.NexusError as exc:
                await self.__aexit__(type(exc), exc, None)
            current_principal.set(self._principal)  # type: ignore[arg-type]
        return self._principal

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        code = grpc.StatusCode.OK
        try:
            if exc is not None:
                code, status = _failure(self._method, exc, self._context)
                if status is not None:
                    await self._context.abort_with_status(status)
        finally:
            _observe(self._method, self._metrics, code, time.perf_counter() - self._started, self._principal)


def _failure(
    method: str, exc: BaseException, context: grpc.aio.ServicerContext
) -> tuple[grpc.StatusCode, grpc.Status | None]:
    """The status code to record, and the status to send (None: let it propagate)."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted with its own code (health's NOT_FOUND)
        return context.code() or grpc.StatusCode.UNKNOWN, None
    if not isinstance(exc, errors.NexusError):
        log.exception("event=rpc_internal_error method=%s", method)
        exc = errors.NexusError()
    return exc.code, errors.to_status(exc)


def _observe(
    method: str, metrics: MethodMetrics, code: grpc.StatusCode, elapsed: float, principal: Principal | None
) -> None:
    metrics.handled(code).inc()
    metrics.duration.observe(elapsed)
    if metrics.streaming:
        metrics.open.dec()
    elif code is grpc.StatusCode.OK:
        metrics.sent.inc()
    if log.isEnabledFor(logging.INFO):
        user = principal.subject if principal else "-"
        service = principal.is_service if principal else False
        log.info(
            "event=rpc method=%s code=%s duration_ms=%.2f user=%s service=%s",
            method, code.name, elapsed * 1000, user, service,
        )
