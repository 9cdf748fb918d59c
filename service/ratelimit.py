"""Per-API-key rate limits in Redis: GCRA (the generic cell rate algorithm) in one Lua script.

GCRA keeps one number per key (the "theoretical arrival time"), so state is O(1) whatever the
limit, where a sliding-window log holds one sorted-set entry per request; it spreads a minute's
budget smoothly (no double burst at a fixed window's edge) and yields exact Retry-After and
reset times. The script reads Redis' clock, so every API process shares one notion of now, and
runs atomically, so concurrent requests of one key cannot both take the last slot.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Final

from redis import Redis
from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Principal
from service.config import Settings
from service.errors import ApiError, unavailable

logger = logging.getLogger(__name__)

PERIOD_S: Final = 60  # limits are per minute
STATE_KEY: Final = "rate_limit"  # request.state attribute the header middleware reads

# KEYS[1]: the key's theoretical arrival time (TAT), in microseconds of Redis' clock.
# ARGV[1]: emission interval (period / limit, us); ARGV[2]: limit (the burst).
# Returns {allowed, remaining, retry_after_us, reset_us}; reset is when the full limit is back.
# string.format: Lua 5.1 prints numbers with 14 significant digits, too few for epoch us.
_GCRA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local period = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', string.format('%.0f', math.ceil((new_tat - now) / 1000)))
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
"""


@dataclass(frozen=True)
class RateLimitState:
    """One request's verdict, and what the X-RateLimit-* headers tell the client."""

    limit: int
    remaining: int
    reset_s: int  # until the whole limit is available again
    retry_after_s: int  # 0 when allowed

    @property
    def allowed(self) -> bool:
        return self.retry_after_s == 0

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimiter:
    """GCRA over a Redis client, with a short back-off after Redis errors."""

    def __init__(self, redis: Redis, period_s: float = PERIOD_S) -> None:
        self.redis = redis
        self.period_us = int(period_s * 1_000_000)
        self._script = redis.register_script(_GCRA)  # EVALSHA, loading the script on NOSCRIPT
        self._skip_until = 0.0  # time.monotonic(); Redis is presumed down before it
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int) -> RateLimitState:
        """Count one request against `limit` per period; raises RedisError if Redis fails."""
        interval = max(1, self.period_us // limit)
        allowed, remaining, retry_us, reset_us = self._script(keys=[key], args=[interval, limit])
        return RateLimitState(
            limit=limit,
            remaining=int(remaining),
            reset_s=math.ceil(int(reset_us) / 1_000_000),
            retry_after_s=0 if allowed else max(1, math.ceil(int(retry_us) / 1_000_000)),
        )

    def available(self) -> bool:
        """False for a while after a Redis error (see `failed`)."""
        return time.monotonic() >= self._skip_until

    def failed(self, recheck_s: float) -> bool:
        """Note a Redis error; True for the first one of an outage (worth a log line)."""
        with self._lock:
            first = self.available()
            self._skip_until = time.monotonic() + recheck_s
        return first


def enforce_rate_limit(request: HTTPConnection, principal: Principal, settings: Settings) -> None:
    """Count the request against the caller's key: 429 `rate_limited` over the limit.

    Called by `get_principal`, so every authenticated route is limited (and by the live
    stream's handshake, which authenticates itself: a WebSocket is an HTTPConnection). If Redis is
    unreachable the request goes through (`rate_limit_fail_open`, logged) or is 503.
    """
    limiter: RateLimiter = request.app.state.rate_limiter
    limit = principal.rate_limit_per_minute or settings.rate_limit_per_minute
    if not limiter.available():
        _without_limiter(settings)
        return
    try:
        state = limiter.hit(f"{settings.rate_limit_key_prefix}{principal.key_id}", limit)
    except RedisError as exc:
        if limiter.failed(settings.rate_limit_recheck_s):
            verdict = "let through" if settings.rate_limit_fail_open else "refused"
            logger.warning("rate limiter: Redis unavailable (%s); requests are %s", exc, verdict)
        _without_limiter(settings)
        return
    setattr(request.state, STATE_KEY, state)
    if not state.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"at most {limit} requests per minute for this API key",
            {"limit": limit, "retry_after_s": state.retry_after_s},
            state.headers(),
        )


def _without_limiter(settings: Settings) -> None:
    """Fail open (return), or closed: 503 `rate_limiter_unavailable`."""
    if not settings.rate_limit_fail_open:
        raise unavailable(
            "rate_limiter_unavailable", "the rate limiter is unavailable", settings.retry_after_s
        )


class RateLimitHeaders:
    """ASGI middleware: adds the limiter's X-RateLimit-* headers to every response of a
    counted request, including responses a route builds itself (204, files), which FastAPI's
    injected `Response` would not reach."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # request.state lives in the scope, shared with the route's Request.
                state = scope.get("state", {}).get(STATE_KEY)
                if isinstance(state, RateLimitState):
                    headers = MutableHeaders(scope=message)
                    for name, value in state.headers().items():
                        if name not in headers:
                            headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
