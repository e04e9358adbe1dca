"""Per-caller quotas: a budget of requests and one of images, each a rate per second with a burst,
counted by the ``limits`` library in memory (per worker) or in Redis (shared by all workers and
replicas).

A budget of rate R per second with a burst of B is "at most B in any window of B/R seconds": a
caller may spend B at once, then R per second on average. The window must be a whole number of
seconds (``limits`` counts in seconds), so B must be R times a whole number. The windows are
counted by ``limits``' sliding window counter: the count of the current fixed window plus that of
the previous one weighted by how much of it still lies within the last B/R seconds. Two counters
per caller and budget, so a check costs the same whatever the budget (an exact moving window
keeps one entry per unit spent: a budget of thousands of images would cost thousands of entries).

When Redis cannot be reached, ``AEGAN_RATE_LIMIT_FAILURE`` says what happens (never a 5xx other
than the documented 503 of ``closed``):

- ``local`` (default): each worker counts in its own memory, with its share of each budget (the
  budget divided by ``AEGAN_WORKERS``), until Redis answers again;
- ``open``: no quota is enforced until Redis answers again;
- ``closed``: every request that needs a quota is answered 503 with ``Retry-After``.

Redis is tried again at most once a second while it is down, so a dead Redis costs no time per
request.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Environment, SettingsError, env_var, read_environment, redacted

if TYPE_CHECKING:  # limits is imported when quotas are on
    from limits import RateLimitItem

logger = logging.getLogger("bentoml.aegan_serve.quotas")

REDIS_TIMEOUT_S = 0.25  # a Redis that does not answer within this is taken as down
RETRY_DOWN_S = 1.0  # while Redis is down, try it again at most this often
AUTH_FAILURE_WINDOW_S = 60  # failed key attempts per client address are counted over a minute
MAX_TRACKED_ADDRESSES = 100_000  # addresses with recent failed keys kept before pruning


@dataclass(frozen=True)
class Budget:
    """``burst`` units in any ``window_s`` seconds: ``burst / window_s`` per second on average."""

    name: str  # "requests" or "images": the policy name in the RateLimit headers
    burst: int
    window_s: int

    @property
    def rate(self) -> float:
        return self.burst / self.window_s

    def share(self, parts: int) -> Budget:
        """This budget split over ``parts`` counters (at least 1 unit each)."""
        return Budget(self.name, max(1, self.burst // parts), self.window_s)

    def policy(self) -> str:
        """This budget as an item of the ``RateLimit-Policy`` header (IETF httpapi draft)."""
        return f'"{self.name}";q={self.burst};w={self.window_s}'


def _budget(env: Environment, name: str) -> Budget | None:
    """The budget ``name`` (requests or images): its rate per second and burst variables."""
    rate: float | None = getattr(env, f"quota_{name}_per_s")
    burst: int | None = getattr(env, f"quota_{name}_burst")
    rate_var, burst_var = env_var(f"quota_{name}_per_s"), env_var(f"quota_{name}_burst")
    if rate is None:
        if burst is not None:
            raise SettingsError(f"{burst_var} is set but {rate_var} is not")
        return None
    if burst is None:
        burst = max(1, math.ceil(rate))
    window = burst / rate
    if window < 1 or abs(window - round(window)) > 1e-9:
        near = _whole_bursts(rate, burst)
        example = (
            f"for example {' or '.join(map(str, near))}"
            if near
            else "none is, for windows up to an hour: give a rate that a whole number of seconds "
            "makes whole, such as 0.25 or 2.5"
        )
        raise SettingsError(
            f"{burst_var}={burst} over {rate_var}={rate:g} is a window of {window:g} s; the "
            f"burst must be the rate times a whole number of seconds, at least 1 ({example})"
        )
    return Budget(name, burst, round(window))


def _whole_bursts(rate: float, burst: int) -> list[int]:
    """The bursts next to ``burst`` (the nearest below it, the nearest above) that are ``rate``
    times a whole number of seconds, for windows of 1 s to an hour."""
    whole = sorted(
        {round(rate * w) for w in range(1, 3601) if abs(rate * w - round(rate * w)) < 1e-9} - {0}
    )
    return [b for b in whole if b < burst][-1:] + [b for b in whole if b > burst][:1]


@dataclass(frozen=True)
class QuotaSettings:
    """The quota settings; quotas are on when a budget is set."""

    requests: Budget | None  # AEGAN_QUOTA_REQUESTS_PER_S, AEGAN_QUOTA_REQUESTS_BURST
    images: Budget | None  # AEGAN_QUOTA_IMAGES_PER_S, AEGAN_QUOTA_IMAGES_BURST
    # AEGAN_RATE_LIMIT_STORAGE: memory:// (default, per worker) or redis://[:password@]host:port[/db]
    storage: str
    failure: str  # AEGAN_RATE_LIMIT_FAILURE: local | open | closed, when Redis is unreachable
    auth_failures: int  # AEGAN_AUTH_FAILURES_PER_MIN: wrong keys per client address and minute
    workers: int  # the worker processes of this server: the share of a budget in `local` mode

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, workers: int = 1
    ) -> QuotaSettings:
        return cls.from_environment(read_environment(environ), workers=workers)

    @classmethod
    def from_environment(cls, env: Environment, *, workers: int) -> QuotaSettings:
        return cls(
            requests=_budget(env, "requests"),
            images=_budget(env, "images"),
            storage=env.rate_limit_storage,
            failure=env.rate_limit_failure,
            auth_failures=env.auth_failures_per_min,
            workers=workers,
        )

    @property
    def shared(self) -> bool:
        return not self.storage.startswith("memory://")

    def policies(self) -> str:
        """The ``RateLimit-Policy`` header: every budget in force."""
        return ", ".join(b.policy() for b in (self.requests, self.images) if b is not None)


@dataclass
class Decision:
    """The outcome of spending from a budget."""

    budget: Budget
    allowed: bool
    remaining: int
    reset_s: float  # seconds until the oldest unit in the window expires

    def header(self) -> str:
        """This outcome as an item of the ``RateLimit`` header (IETF httpapi draft)."""
        return f'"{self.budget.name}";r={max(0, self.remaining)};t={math.ceil(self.reset_s)}'

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_s))


class StorageDown(Exception):
    """Redis is unreachable and the failure mode is ``closed``."""


class Quotas:
    """Spends from budgets in the configured storage, with the failure mode when Redis is down.
    Made in a worker process (its Redis connections belong to the worker's event loop)."""

    def __init__(self, settings: QuotaSettings) -> None:
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import (
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
        from limits.storage import storage_from_string

        self.settings = settings
        if settings.shared:
            storage = storage_from_string(
                "async+" + settings.storage,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix="aegan",
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
        else:
            storage = MemoryStorage()
        self.limiter = SlidingWindowCounterRateLimiter(storage)
        # This worker's own counters: the budgets while Redis is down (`local`); failed keys, in an
        # exact moving window (a few entries, only for addresses that failed).
        self.local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.failures = MovingWindowRateLimiter(MemoryStorage())
        self.down_until = 0.0  # Redis is not tried again before this (time.monotonic)
        self.down = False
        self.auth_budget = Budget("auth-failures", settings.auth_failures, AUTH_FAILURE_WINDOW_S)
        self.failed_at: dict[str, float] = {}  # address -> time of its last failed key

    async def spend(self, budget: Budget, who: str, cost: int = 1) -> Decision | None:
        """Spend ``cost`` from ``who``'s ``budget``; None when nothing is counted (Redis down and
        the mode is ``open``). Raises :class:`StorageDown` when it is ``closed``."""
        if time.monotonic() >= self.down_until:
            try:
                decision = await _spend(self.limiter, budget, who, cost)
            except Exception as exc:  # noqa: BLE001  (whatever the Redis client raises)
                self._went_down(exc)
            else:
                if self.down:
                    self.down = False
                    logger.warning("quota store %s answers again", redacted(self.settings.storage))
                return decision
        return await self._fallback(budget, who, cost)

    async def spend_failure(self, who: str) -> None:
        """Count a failed key attempt of ``who`` (in this worker's memory)."""
        if len(self.failed_at) > MAX_TRACKED_ADDRESSES:  # forget those out of the window
            horizon = time.monotonic() - AUTH_FAILURE_WINDOW_S
            self.failed_at = {k: t for k, t in self.failed_at.items() if t > horizon}
        self.failed_at[who] = time.monotonic()
        await _spend(self.failures, self.auth_budget, who, 1)

    async def failures_left(self, who: str) -> Decision | None:
        """``who``'s failed key attempts left (in this worker's memory), without spending; None
        when it has had none within the window (the common case, answered without a lookup)."""
        last = self.failed_at.get(who)
        if last is None or time.monotonic() - last > AUTH_FAILURE_WINDOW_S:
            return None
        budget = self.auth_budget
        stats = await self.failures.get_window_stats(_item(budget), who)
        reset = max(0.0, stats.reset_time - time.time())
        return Decision(budget, stats.remaining > 0, stats.remaining, reset)

    async def _fallback(self, budget: Budget, who: str, cost: int) -> Decision | None:
        if self.settings.failure == "closed":
            raise StorageDown(
                "the quota store (AEGAN_RATE_LIMIT_STORAGE) cannot be reached, and "
                "AEGAN_RATE_LIMIT_FAILURE=closed refuses requests until it can; retry shortly"
            )
        if self.settings.failure == "open":
            return None
        return await _spend(self.local, budget.share(self.settings.workers), who, cost)

    def _went_down(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            logger.warning(
                "quota store %s unreachable (%s: %s); AEGAN_RATE_LIMIT_FAILURE=%s until it answers",
                redacted(self.settings.storage),
                type(exc).__name__,
                exc,
                self.settings.failure,
            )
        self.down_until = time.monotonic() + RETRY_DOWN_S


@functools.cache
def _item(budget: Budget) -> RateLimitItem:
    """The ``limits`` item of ``budget``: ``burst`` per ``window_s`` seconds."""
    from limits import RateLimitItemPerSecond

    return RateLimitItemPerSecond(budget.burst, budget.window_s, namespace=budget.name)


async def _spend(limiter: object, budget: Budget, who: str, cost: int) -> Decision:
    item = _item(budget)
    # limiter: one of limits' async strategies, imported only when quotas are on
    allowed = await limiter.hit(item, who, cost=cost)  # type: ignore[attr-defined]
    stats = await limiter.get_window_stats(item, who)  # type: ignore[attr-defined]
    return Decision(budget, allowed, stats.remaining, max(0.0, stats.reset_time - time.time()))
