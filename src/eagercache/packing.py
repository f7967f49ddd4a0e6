"""Commands packed by hiredis's C packer on asyncio connections too.

redis-py's synchronous connections pack commands with hiredis when it is installed; its asyncio ones still
use the pure-Python packer (redis/redis-py#4176, open; the fix is pull request #4191). A refresh's WRITE
script has 15 arguments, and packing them was ~19 % of a refresh's CPU time in a profile. These connection
classes pack the way the synchronous client does, and keep redis-py's own packer for what hiredis does not
take (memoryviews, or no hiredis at all). Drop this module once redis-py does it itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
from redis.utils import HIREDIS_AVAILABLE

hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None = None
if HIREDIS_AVAILABLE:  # a dependency (redis[hiredis]); without it, redis-py's packer as before
    from hiredis import pack_command as hiredis_pack

# Argument types left to redis-py's packer: memoryviews and bytearrays (hiredis copies them), floats
# (redis-py writes repr(), hiredis its own format), bools (redis-py refuses them, with its error).
_REDIS_PY_TYPES = frozenset((memoryview, bytearray, float, bool))


class _HiredisPacking(AbstractConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        if hiredis_pack is None or not _REDIS_PY_TYPES.isdisjoint(map(type, args)):
            return super().pack_command(*args)
        first = args[0]
        # As redis-py does: a command name with a space ("CONFIG GET") is sent as separate words.
        if isinstance(first, str):
            if " " in first:
                args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis_pack(args)]
        except TypeError:  # something hiredis cannot encode (None, an object): redis-py's own error
            return super().pack_command(*args)


class FastConnection(_HiredisPacking, Connection):
    pass


class FastSSLConnection(_HiredisPacking, SSLConnection):
    pass


class FastUnixDomainSocketConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class FastSentinelManagedConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class FastSentinelManagedSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    pass


FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: FastConnection,
    SSLConnection: FastSSLConnection,
    UnixDomainSocketConnection: FastUnixDomainSocketConnection,
}
