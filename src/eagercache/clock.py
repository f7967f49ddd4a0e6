"""One clock for every replica: the Redis server's, estimated in this process between readings.

Due times, lease ends, `last_retrieved` and `last_modified` are compared across replicas, so each
replica's own wall clock must not decide them: a replica 5 s ahead would claim every refresh, one 5 s
behind would fetch new entries twice. The scripts read `TIME` themselves where they compare; what
Python needs (the times written into an entry, Age, Date) comes from this estimate of the server's
clock, kept as an offset from the monotonic clock, so a step of the local wall clock changes nothing.
"""

from __future__ import annotations

import time

# A reading is trusted to half its round trip; a slower one is ignored once the clock has a good reading
# (a round trip this long says the reply sat in a queue, not when the server read its clock).
MAX_TRUSTED_ROUND_TRIP_MS = 50.0


class ServerClock:
    """Milliseconds since the epoch by the store's clock; the local clock until the first reading."""

    __slots__ = ("_best_round_trip_ms", "_offset_ms", "synced")

    def __init__(self) -> None:
        self._offset_ms = time.time() * 1000 - time.monotonic() * 1000
        self._best_round_trip_ms = float("inf")
        self.synced = False

    def now_ms(self) -> int:
        return int(time.monotonic() * 1000 + self._offset_ms)

    def observe(self, server_ms: float, sent: float, received: float) -> None:
        """A server time read between `sent` and `received` (time.monotonic()): assume the midpoint."""
        round_trip_ms = (received - sent) * 1000
        # On a slow link every reading is slow: trust readings about as good as the best one seen.
        trusted_ms = max(MAX_TRUSTED_ROUND_TRIP_MS, 2 * self._best_round_trip_ms)
        self._best_round_trip_ms = min(self._best_round_trip_ms, round_trip_ms)
        if self.synced and round_trip_ms > trusted_ms:
            return
        self._offset_ms = server_ms - (sent + received) / 2 * 1000
        self.synced = True

    def skew_ms(self) -> float:
        """How far this host's wall clock is ahead of the store's (negative: behind); for logs and metrics."""
        return time.time() * 1000 - self.now_ms()
