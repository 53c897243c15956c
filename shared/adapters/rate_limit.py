"""One Stripe request budget shared by every process and machine (SPEC 6).

Stripe allows 100 requests/s in live mode and 25 in test mode per account, whatever
the number of workers. A token bucket kept in Redis (``REDIS_URL``) and changed only
by one Lua script, so the check-and-take is atomic across processes, holds all of
them to ``STRIPE_MAX_RPS``, paced evenly. A caller that would wait too long gets
``RateLimited`` and backs off like on a Stripe 429: a rate limit is never a failure.
"""

from __future__ import annotations

import functools
import logging
import time

import redis
import stripe

from shared.adapters.config import get_settings
from shared.adapters.metrics import observe_stripe_budget

log = logging.getLogger(__name__)

BUCKET_KEY = "refunds:stripe-rate-limit"
MAX_WAIT_SECONDS = 5.0
#: Share of STRIPE_MAX_RPS the workers send at. Stripe counts requests when they arrive,
#: and a few ms of jitter between taking a token and the request landing bunch requests
#: up: paced at exactly Stripe's limit, a few of them got 429s (make bench: 3 in 2,000);
#: 5 % under it, none did.
HEADROOM = 0.95

# Reserve one token: refill by elapsed time (Redis' clock, the same for every caller),
# take a token if there is one, else reserve the next one and say how long to wait.
# A reservation further out than max_wait is refused without taking anything.
# KEYS[1] bucket; ARGV rate/s, capacity, max_wait_us. Returns microseconds to wait, or -1.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate / 1000000)
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 1000000 / rate)
  if wait > max_wait then
    return -1
  end
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return wait
"""


class RateLimited(stripe.RateLimitError):
    """Our own budget is spent for longer than a caller should wait: back off.

    A ``stripe.RateLimitError`` (429), so every caller that copes with Stripe's own
    rate limiting copes with this one too."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            f"Stripe request budget (STRIPE_MAX_RPS) spent; retry in {retry_after:.1f}s",
            http_status=429,
            headers={"Retry-After": f"{retry_after:.3f}"},
            code="rate_limited",
        )
        self.retry_after = retry_after


class StripeRateLimiter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        rate: float,
        capacity: float = 1.0,
        key: str = BUCKET_KEY,
        max_wait: float = MAX_WAIT_SECONDS,
    ) -> None:
        self._client = client
        self._rate = rate
        # No burst by default: requests paced evenly, 1/rate apart. With a one-second
        # burst, threads that hear Stripe's answers together (their calls left together)
        # took their next refunds together and sent those at once too; that lockstep
        # held, and the worker's CPU came in bunches that stalled the web processes
        # beside it (make bench's webhook burst: p99 94-122 ms against 69-98 paced).
        self._capacity = capacity
        self._key = key
        self._max_wait = max_wait
        self._script = client.register_script(_BUCKET_SCRIPT)

    def acquire(self) -> None:
        """Block until this process may send one Stripe request; ``RateLimited`` if too long."""
        try:
            args = [self._rate, self._capacity, self._max_wait * 1e6]
            wait_us = int(self._script(keys=[self._key], args=args))
        except redis.RedisError:
            # Fail open: the limiter only spares Stripe's 429s, which are retried anyway;
            # a Redis outage must not stop refunds that are already being sent.
            log.warning("Stripe rate limiter unavailable; sending without it", exc_info=True)
            return
        if wait_us < 0:
            observe_stripe_budget(waited=None)
            raise RateLimited(retry_after=1.0 / self._rate + self._max_wait)
        observe_stripe_budget(waited=wait_us / 1e6)
        if wait_us:
            time.sleep(wait_us / 1e6)


@functools.cache
def get_limiter() -> StripeRateLimiter:
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=30
    )
    return StripeRateLimiter(client, rate=settings.stripe_max_rps * HEADROOM)
