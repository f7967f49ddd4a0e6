"""The Lua scripts the store runs. Each runs atomically in Redis (and in fakeredis, through lupa).

Each script touches the keys of one bucket only (keys.py), all in one hash slot, and declares them in
KEYS, so that Redis Cluster routes it to the node that holds them, refuses it (TRYAGAIN, retried) while
that slot is half-migrated instead of running it on half the keys, and refuses any cross-slot access
(the store adds a `#!lua` shebang on servers that know one, Redis/Valkey 7+: see FLAGS). The only keys a
script derives from its arguments are the items of entries it finds in its schedule; those accesses are
`pcall`ed, so a key that is elsewhere mid-reshard skips that one entry instead of failing the batch.

Every time a script compares or stores is read from the server's own clock (`TIME`), so replicas whose
clocks disagree still agree on what is due (see clock.py). Scores come back from ZSCORE as strings;
'-1' stands for "no score" because a nil would cut a Lua array short.
"""

from __future__ import annotations

# Milliseconds since the epoch by the server's clock. Lua numbers are doubles: exact for these values.
_TIME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Reading stored headers (item.Entry), and the tag index that follows their tags.
_HEADER = """
-- The header line of an entry's item (without the body after it); '' if there is none, or if the key is
-- not a string (not eagercache's): one odd key must not stop a claim half-way through its batch.
local function header_of(key, last_byte)
  local header = redis.pcall('GETRANGE', key, 0, last_byte)
  if type(header) ~= 'string' then return '' end
  local line_end = string.find(header, '\\n', 1, true)
  if line_end then return string.sub(header, 1, line_end) end
  return header
end
-- A header line's tags, as stored: percent-encoded, joined by ',' ('' for none).
local function tags_of(line)
  return string.match(line, ' #([^ \\n]*)') or ''
end
-- Add (SADD) or remove (SREM) the entry `id` to or from the index set of each tag in `tags` but not in
-- `except`. The set's key is derived (prefix .. tag), in the entry's slot: pcall'ed, as item keys are.
local function index(command, prefix, id, tags, except)
  if tags == except then return end
  local skip = {}
  for tag in string.gmatch(except, '[^,]+') do skip[tag] = true end
  for tag in string.gmatch(tags, '[^,]+') do
    if not skip[tag] then redis.pcall(command, prefix .. tag, id) end
  end
end
"""

_NOW = _TIME + _HEADER

# How long a claim is kept for a retry of that claim: a retry comes within a command's timeout.
CLAIM_REPLY_KEPT_MS = 30_000
# A shadow key expires this long after its entry is due, or after its claim's lease ends: its `expired`
# event then says "due, and nobody has it". An entry refreshed on time has its shadow key rewritten first
# (a claim moves it to the lease's end, the write to the next due time), so it sends no event at all.
# Expiring at the due time itself, every refresh sent one to every process (each parsed them all), ~25 us
# of a process's CPU per refresh at 10,000 due per second, for a hint the schedule had already acted on.
SHADOW_GRACE_MS = 250
_SHADOW_GRACE = f"""
local shadow_grace_ms = {SHADOW_GRACE_MS}
"""
# A claim, kept for a retry of that very claim. A claim's connection may break after the script ran (a
# server failing over, a cluster client dropping its connections on MOVED) and the client sends it again as
# it was: without the first run's reply, the retry would find its entries leased, and they would wait out
# their lease (a fetcher's timeout + 5 s) unrefreshed. KEYS[3] is this process's last claim in the bucket,
# `<token> <lease end> ` then `<bytes>:<id>` per entry (an id in the schedule could hold any byte); ARGV[1]
# the claim's token, unique per claim. A retry is answered with those entries, their read times and
# headers read again, and no due time ('-1': the claim moved it); its `now` is the current time (a
# claim's reply feeds the clock). Only the ids are kept: a claim pays ~1 us per entry less than keeping
# its whole reply cost (measured on redis-server 7.0), and a retry is rare.
_REPLAY = (
    """
local function replay_of(key, token, read_key, item_prefix, last_byte)
  if redis.call('GETRANGE', key, 0, #token) ~= token .. ' ' then return nil end
  local kept = redis.call('GET', key)
  local space = string.find(kept, ' ', #token + 2, true)
  local out, at = {now, tonumber(string.sub(kept, #token + 2, space - 1)), '-1'}, space + 1
  while at <= #kept do
    local colon = string.find(kept, ':', at, true)
    local id = string.sub(kept, colon + 1, colon + tonumber(string.sub(kept, at, colon - 1)))
    out[#out + 1] = id
    out[#out + 1] = redis.call('ZSCORE', read_key, id) or '-1'
    out[#out + 1] = '-1'
    out[#out + 1] = header_of(item_prefix .. id, last_byte)
    at = colon + #id + 1
  end
  return out
end
local function keep_claim(key, token, lease_end, out)
  local parts = {token, ' ', lease_end, ' '}
  for i = 4, #out, 4 do
    parts[#parts + 1] = #out[i]
    parts[#parts + 1] = ':'
    parts[#parts + 1] = out[i]
  end
  redis.call('SET', key, table.concat(parts), 'PX', """
    + str(CLAIM_REPLY_KEPT_MS)
    + """)
end
"""
)

# One entry taken by a claim (CLAIM_DUE, CLAIM_MANY; KEYS: due, read): its score moves to the lease end and
# its shadow key (if `shadow_prefix` is not '') to the lease end + the grace; its read time, due time and
# header go into the claim's reply `out`.
_TAKE = (
    _SHADOW_GRACE
    + """
local function take(id, due, header, lease_end, shadow_prefix, out)
  redis.call('ZADD', KEYS[1], lease_end, id)
  if shadow_prefix ~= '' then
    redis.call('SET', shadow_prefix .. id, '', 'PX', lease_end - now + shadow_grace_ms, 'XX')
  end
  local read = redis.call('ZSCORE', KEYS[2], id)
  -- an entry with no read time (its record was lost) starts counting towards max_idle now
  if not read then redis.call('ZADD', KEYS[2], now, id) end
  out[#out + 1] = id
  out[#out + 1] = read or '-1'
  out[#out + 1] = due
  out[#out + 1] = header
end
"""
)

# Claim up to ARGV[3] entries due now by moving their score to now + ARGV[2], the lease end: whoever moved
# an entry owns its refresh, and if it dies the lease runs out and the entry is due again.
# KEYS: due, read, this process's last claim (_REPLAY). ARGV[1]: the claim's token; ARGV[4]: the item key
# prefix; ARGV[5]: the last byte of the header to return; ARGV[6]: the shadow key prefix ('' for none): a
# claimed entry's shadow key then expires only if the lease runs out (SHADOW_GRACE_MS). Only a shadow key
# still there is moved (XX): one claimed over the grace late has sent its event, and recreating it cost
# redis-server a key to create per refresh in a backlog, where the server is the bottleneck.
# Returns now, lease end, the bucket's next due time after this claim ('-1' if its schedule is empty), then
# id, last-read, due, header, ... where header is the start of the stored value (item.Entry's header
# line), so a refresh that brings unchanged data needs no read of the old value.
CLAIM_DUE = (
    _NOW
    + _REPLAY
    + _TAKE
    + """
local replay = replay_of(KEYS[3], ARGV[1], KEYS[2], ARGV[4], ARGV[5])
if replay then return replay end
local lease_end = now + tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {now, lease_end, '-1'}
for i = 1, #due, 2 do
  take(due[i], due[i + 1], header_of(ARGV[4] .. due[i], ARGV[5]), lease_end, ARGV[6], out)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then out[3] = first[2] end
if #out > 3 then keep_claim(KEYS[3], ARGV[1], lease_end, out) end
return out
"""
)

# Claim the entries ARGV[6..] that expired shadow keys say are due, if they are (ARGV: token, lease ms,
# item key prefix, last header byte, shadow key prefix as in CLAIM_DUE, ids...). An entry that is stored
# but missing from the schedule is claimed too, so a damaged schedule heals. KEYS: due, read, this
# process's last claim (_REPLAY). Returns what CLAIM_DUE does, for the claimed ones (no next due time: '-1').
CLAIM_MANY = (
    _NOW
    + _REPLAY
    + _TAKE
    + """
local replay = replay_of(KEYS[3], ARGV[1], KEYS[2], ARGV[3], ARGV[4])
if replay then return replay end
local lease_end = now + tonumber(ARGV[2])
local out = {now, lease_end, '-1'}
for i = 6, #ARGV do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  local header = header_of(ARGV[3] .. id, ARGV[4])
  if (due and tonumber(due) <= now) or (not due and header ~= '') then
    take(id, due or '-1', header, lease_end, ARGV[5], out)
  end
end
if #out > 3 then keep_claim(KEYS[3], ARGV[1], lease_end, out) end
return out
"""
)

# Give claims back (ARGV: id, lease end, delay ms, id, lease end, delay ms, ...) where they are still ours:
# due again, for anyone, after the delay (0: at once). KEYS: due. Returns how many were given back.
RELEASE = (
    _TIME
    + """
local released = 0
for i = 1, #ARGV, 3 do
  local due = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if due and tonumber(due) == tonumber(ARGV[i + 1]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[i + 2]), ARGV[i])
    released = released + 1
  end
end
return released
"""
)

# A fetcher's upstream budget (max_rate), shared by every replica: a token bucket in the hash KEYS[1]
# (tokens, at: ms), refilled at ARGV[1] tokens per second up to ARGV[2]. Takes up to ARGV[3] tokens, or
# all of them with ARGV[4] '1' (a fetch that does not wait: its cost is owed, and later refreshes wait
# for it). Returns how many were taken.
TAKE_BUDGET = (
    _TIME
    + """
local rate, burst, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local taken = wanted
if ARGV[4] ~= '1' then taken = math.max(0, math.min(wanted, math.floor(tokens))) end
tokens = tokens - taken
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
-- gone once full again: an idle fetcher's budget costs nothing
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return taken
"""
)

# Store an entry and schedule its next refresh (and let go of the cold-fill lock, if any).
# KEYS: item, shadow, due, read, stale, counts, fill.
# ARGV: id, body, due at, fetcher, room, mode. `room` is how many of the fetcher's entries this bucket may
# hold: max_entries less what the other buckets held when this process last counted (see Store.write).
# mode 'cold': a reader's fetch; a new entry counts against that room and is marked read now. An entry
# is counted while its item or its schedule member exists: one whose item was lost but whose member is
# still there is counted already, and is not counted again.
# mode 'refresh': only an entry that still exists is written. One whose item was deleted meanwhile
# (by hand, by eviction) is dropped whole; it is counted out unless FORGET did that already (then it
# is no longer scheduled).
# ARGV[7]: a refresh's lease end ('' for none: a cold write, an admin's refresh). The write is the claim
# holder's only while the schedule still shows its lease (or no score at all: the member was lost). If it
# shows the due time this write sets and the item has this write's header line, an earlier try of the same
# write was applied and its reply lost: done already. The score alone does not say so: a lease can end at
# that very ms (an entry claimed at its due time, with a lease as long as its ttl), and that write was
# then skipped, the entry left unrefreshed for a whole ttl. Any other score is someone else's claim or
# write since: not ours to overwrite.
# ARGV[8]: '1' to set the shadow key (expiry events on: it expires SHADOW_GRACE_MS after the due time), ''
# for none.
# ARGV[9], ARGV[10]: the bucket's tag key prefix, the last byte of a header: the entry leaves the index
# sets of the tags the stored value had and the new one has not, and joins those of its new tags.
# Returns 1 stored, 0 not stored (fetcher at max entries), -1 not stored (entry gone), -2 not stored
# (no longer this refresh's).
WRITE = (
    _NOW
    + _SHADOW_GRACE
    + """
if ARGV[7] ~= '' then
  local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if score and tonumber(score) == tonumber(ARGV[3]) then
    local stored = header_of(KEYS[1], tonumber(ARGV[10]))
    if stored ~= '' and string.sub(ARGV[2], 1, #stored) == stored then return 1 end
  end
  if score and tonumber(score) ~= tonumber(ARGV[7]) then return -2 end
end
local is_new = redis.call('EXISTS', KEYS[1]) == 0
if is_new then
  if ARGV[6] ~= 'cold' then
    if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[6], ARGV[4], -1) end
    redis.call('ZREM', KEYS[4], ARGV[1])
    redis.call('DEL', KEYS[2], KEYS[5])
    return -1
  end
  if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    if tonumber(redis.call('HGET', KEYS[6], ARGV[4]) or '0') >= tonumber(ARGV[5]) then
      redis.call('DEL', KEYS[7])
      return 0
    end
    redis.call('HINCRBY', KEYS[6], ARGV[4], 1)
  end
end
local old_tags = ''
if not is_new then old_tags = tags_of(header_of(KEYS[1], tonumber(ARGV[10]))) end
local new_tags = tags_of(string.match(ARGV[2], '^[^\\n]*'))
index('SREM', ARGV[9], ARGV[1], old_tags, new_tags)
index('SADD', ARGV[9], ARGV[1], new_tags, old_tags)
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[8] == '1' then
  redis.call('SET', KEYS[2], '', 'PX', math.max(0, tonumber(ARGV[3]) - now) + shadow_grace_ms)
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
if ARGV[6] == 'cold' then redis.call('ZADD', KEYS[4], now, ARGV[1]) end
redis.call('DEL', KEYS[5], KEYS[7])
return 1
"""
)

# After a failed refresh: keep the body, mark the entry stale, try again later.
# KEYS: item, shadow, due, stale, read, counts. ARGV: id, retry in ms, stale marker ('' to leave the
# marker alone), fetcher, '1' to set the shadow key (expiring SHADOW_GRACE_MS after the retry; '' for
# none). An entry whose item is gone is dropped whole, as in WRITE. Returns 0 if it is gone.
POSTPONE = (
    _NOW
    + _SHADOW_GRACE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[6], ARGV[4], -1) end
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[4])
  return 0
end
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[3]) end
if ARGV[5] == '1' then redis.call('SET', KEYS[2], '', 'PX', tonumber(ARGV[2]) + shadow_grace_ms) end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# Remove an entry and everything about it. KEYS: item, shadow, due, read, stale, counts. ARGV: id, fetcher,
# the bucket's tag key prefix, the last byte of a header. Returns 1 if the entry had a stored item.
FORGET = (
    _HEADER
    + """
index('SREM', ARGV[3], ARGV[1], tags_of(header_of(KEYS[1], tonumber(ARGV[4]))), '')
local existed = redis.call('DEL', KEYS[1])
local scheduled = redis.call('ZREM', KEYS[3], ARGV[1])
if existed == 1 or scheduled == 1 then redis.call('HINCRBY', KEYS[6], ARGV[2], -1) end
redis.call('DEL', KEYS[2], KEYS[5])
redis.call('ZREM', KEYS[4], ARGV[1])
return existed
"""
)

# Remove the entries ARGV[8..] (ARGV[1] 'forget'), or make them due now (ARGV[1] 'refresh': a claim of
# one in flight is overtaken, its write dropped, and the entry fetched again), if they carry the tag
# ARGV[2] (percent-encoded; '' for no tag check). An id whose item is gone, or that no longer carries
# the tag, leaves that tag's index set. KEYS: due, read, counts. ARGV[3..7]: the bucket's item, shadow,
# stale and tag key prefixes, the last byte of a header. Returns the ids removed or made due.
TARGET = (
    _NOW
    + """
local out = {}
for i = 8, #ARGV do
  local id = ARGV[i]
  local item = ARGV[3] .. id
  local header = header_of(item, tonumber(ARGV[7]))
  local tags = tags_of(header)
  if header == '' or (ARGV[2] ~= '' and not string.find(',' .. tags .. ',', ',' .. ARGV[2] .. ',', 1, true)) then
    if ARGV[2] ~= '' then redis.pcall('SREM', ARGV[6] .. ARGV[2], id) end
  elseif ARGV[1] == 'forget' then
    index('SREM', ARGV[6], id, tags, '')
    redis.pcall('DEL', item, ARGV[4] .. id, ARGV[5] .. id)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HINCRBY', KEYS[3], string.match(id, '^[^?]*'), -1)  -- it had an item: it was counted
    out[#out + 1] = id
  else
    redis.call('ZADD', KEYS[1], now, id)
    out[#out + 1] = id
  end
end
return out
"""
)

# Drop schedule members whose item is gone (deleted by hand, evicted), with their shadow, stale marker and
# read time, and count them out, as a refresh that found the item gone would (a later WRITE or POSTPONE
# then finds nothing to count out). KEYS: due, read, counts. ARGV: item key prefix, shadow key prefix,
# stale key prefix, ids... Returns how many were dropped.
PRUNE = """
local dropped = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.pcall('EXISTS', ARGV[1] .. id) == 0 and redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('ZREM', KEYS[2], id)
    redis.pcall('DEL', ARGV[2] .. id, ARGV[3] .. id)
    redis.call('HINCRBY', KEYS[3], string.match(id, '^[^?]*'), -1)
    dropped = dropped + 1
  end
end
return dropped
"""

# Set entry counts found by a sweep, each only if the count is still what it was when the sweep began:
# a write or a removal during the sweep (which the scan may or may not have seen) leaves it to the next
# sweep. KEYS: counts. ARGV: fetcher, count before, count found, ... Returns how many were set.
RECOUNT = """
local set = 0
for i = 1, #ARGV, 3 do
  if tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') == tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    set = set + 1
  end
end
return set
"""

# Put stored entries that lost their place in the schedule (evicted, deleted by hand) back on it, due
# now; an entry on the schedule (or claimed: its score is a lease end) is left alone.
# KEYS: due, read. ARGV: item key prefix, ids... Returns the ids put back.
REPAIR = (
    _NOW
    + """
local repaired = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], id) and redis.pcall('EXISTS', ARGV[1] .. id) == 1 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('ZADD', KEYS[2], 'NX', now, id)
    repaired[#repaired + 1] = id
  end
end
return repaired
"""
)


# The shebang each script gets on servers that know one (Redis/Valkey 7+). With a shebang Redis refuses
# any access outside the script's one slot, and refuses a write script outright while the server is out
# of memory (before it changes anything) unless it may run then: the scripts that only delete or give
# back may, so that invalidation and cleanup still work when memory is full.
FLAGS = {
    CLAIM_DUE: "#!lua",
    CLAIM_MANY: "#!lua",
    RELEASE: "#!lua flags=allow-oom",
    WRITE: "#!lua",
    POSTPONE: "#!lua",
    FORGET: "#!lua flags=allow-oom",
    TAKE_BUDGET: "#!lua",
    TARGET: "#!lua flags=allow-oom",
    PRUNE: "#!lua flags=allow-oom",
    RECOUNT: "#!lua",
    REPAIR: "#!lua",
}


def with_shebang(script: str) -> str:
    return f"{FLAGS[script]}\n{script}"
