"""The Lua scripts the store runs. Each runs atomically in Redis (and in fakeredis, through lupa).

Times are milliseconds since the epoch, passed in by the caller: one clock for the whole script.
Scores come back from ZSCORE as strings; '-1' stands for "no score" because a nil would cut a Lua
array short.
"""

from __future__ import annotations

# Claim up to ARGV[3] entries due by ARGV[1] by moving their score to ARGV[2], the lease end: whoever moved
# an entry owns its refresh, and if it dies the lease runs out and the entry is due again.
# KEYS: due, read. ARGV[4]: the item key prefix; ARGV[5]: the last byte of the header to return.
# Returns id, last-read, due, header, ... where header is the start of the stored value (item.Entry's
# header line), so a refresh that brings unchanged data needs no read of the old value.
CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local read = redis.call('ZSCORE', KEYS[2], id)
  -- an entry with no read time (its record was lost) starts counting towards max_idle now
  if not read then redis.call('ZADD', KEYS[2], ARGV[1], id) end
  out[#out + 1] = id
  out[#out + 1] = read or '-1'
  out[#out + 1] = due[i + 1]
  out[#out + 1] = redis.call('GETRANGE', ARGV[4] .. id, 0, ARGV[5])
end
return out
"""

# Claim the entries ARGV[5..] that expired shadow keys say are due, if they are (ARGV: now, lease end,
# item key prefix, last header byte, ids...). An entry that is stored but missing from the schedule is claimed too, so
# a damaged schedule heals. KEYS: due, read. Returns what CLAIM_DUE does, for the claimed ones.
CLAIM_MANY = """
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  local header = redis.call('GETRANGE', ARGV[3] .. id, 0, ARGV[4])
  if (due and tonumber(due) <= tonumber(ARGV[1])) or (not due and header ~= '') then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    local read = redis.call('ZSCORE', KEYS[2], id)
    if not read then redis.call('ZADD', KEYS[2], ARGV[1], id) end
    out[#out + 1] = id
    out[#out + 1] = read or '-1'
    out[#out + 1] = due or '-1'
    out[#out + 1] = header
  end
end
return out
"""

# Give a claim back (ARGV: id, lease end, now) if it is still ours: due again at once, for anyone.
# KEYS: due.
RELEASE = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and tonumber(due) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

# Store an entry and schedule its next refresh (and let go of the cold-fill lock, if any).
# KEYS: item, shadow, due, read, stale, counts, fill.
# ARGV: id, body, due-in ms, now, due at, fetcher, max entries, mode.
# mode 'cold': a reader's fetch; a new entry counts against max entries and is marked read now.
# mode 'refresh': only an entry that still exists is written. One whose item was deleted meanwhile
# (by hand, by eviction) is dropped whole; it is counted out unless FORGET did that already (then it
# is no longer scheduled).
# Returns 1 stored, 0 not stored (fetcher at max entries), -1 not stored (entry gone).
WRITE = """
local is_new = redis.call('EXISTS', KEYS[1]) == 0
if is_new then
  if ARGV[8] ~= 'cold' then
    if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[6], ARGV[6], -1) end
    redis.call('ZREM', KEYS[4], ARGV[1])
    redis.call('DEL', KEYS[2], KEYS[5])
    return -1
  end
  if tonumber(redis.call('HGET', KEYS[6], ARGV[6]) or '0') >= tonumber(ARGV[7]) then
    redis.call('DEL', KEYS[7])
    return 0
  end
  redis.call('HINCRBY', KEYS[6], ARGV[6], 1)
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '', 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
if ARGV[8] == 'cold' then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1]) end
redis.call('DEL', KEYS[5], KEYS[7])
return 1
"""

# After a failed refresh: keep the body, mark the entry stale, try again later.
# KEYS: item, shadow, due, stale, read, counts. ARGV: id, due-in ms, due at, stale marker ('' to leave the
# marker alone), fetcher. An entry whose item is gone is dropped whole, as in WRITE. Returns 0 if it is gone.
POSTPONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[6], ARGV[5], -1) end
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[4])
  return 0
end
if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4]) end
redis.call('SET', KEYS[2], '', 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""

# Remove an entry and everything about it. KEYS: item, shadow, due, read, stale, counts. ARGV: id, fetcher.
# Returns 1 if the entry had a stored item.
FORGET = """
local existed = redis.call('DEL', KEYS[1])
if existed == 1 then redis.call('HINCRBY', KEYS[6], ARGV[2], -1) end
redis.call('DEL', KEYS[2], KEYS[5])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return existed
"""
