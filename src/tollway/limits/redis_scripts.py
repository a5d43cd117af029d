"""Lua scripts of the Redis limit store (see redis_store.py for the calling side).

The window algorithms are line-for-line ports of gcra.py and windows.py, with the
same float formulas in the same order, so that a check in Redis gives the same
Decision as the pure function at the same `now` (Lua numbers are IEEE doubles,
like Python floats; Python's banker's round() is ported as round_half_even).
Keep both sides in step: tests/limits/test_redis_store.py compares them.

Conventions:
- ARGV[1] is `now` in epoch seconds, or "" for Redis's own clock (TIME).
- One limit is a record in ARGV (see read_spec); KEYS[i] is the counter of limit i.
- A counter is a string value: gcra "tat"; sliding "window_start previous current";
  fixed "window_start used window_end". It carries a PX TTL that ends when the
  state is as good as fresh (multi.expires_at); a state is also read as fresh
  once that instant has passed by the script's clock (so an explicit `now`
  behaves like MemoryLimiter's expiry).
- Redis truncates Lua numbers to integers in replies, so CHECK answers with the
  exact bits (struct.pack of doubles). Stored states stay exact text ('%.17g',
  or '%d' for whole numbers), readable by both scripts and by older versions.
- CHECK runs on every limited request and is written flat for Redis's CPU (about
  half the Redis CPU of the table-per-record form REFUND keeps): the shared prelude
  below is REFUND's; CHECK has its own copy of the same formulas.
"""

from __future__ import annotations

_PRELUDE = r"""
local EPS = 1e-6
local INF = math.huge

local function fmt(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end

local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function round_half_even(x)
  local f = math.floor(x)
  local d = x - f
  if d > 0.5 then return f + 1 end
  if d < 0.5 then return f end
  if f % 2 == 0 then return f end
  return f + 1
end

-- A record: kind, cost, limit, then by kind
--   g: period capacity          (GCRA; interval = period / limit)
--   s: period                   (sliding window)
--   f: period                   (fixed window on epoch multiples: second/minute/hour)
--   c: s0 e0 s1 e1 s2 e2        (calendar fixed window: bounds of the previous,
--                                current and next windows around Python's clock)
local function read_spec(argv, at)
  local spec = {kind = argv[at], cost = tonumber(argv[at + 1]), limit = tonumber(argv[at + 2])}
  if spec.kind == 'g' then
    spec.period = tonumber(argv[at + 3])
    spec.capacity = tonumber(argv[at + 4])
    spec.interval = spec.period / spec.limit
    return spec, at + 5
  end
  if spec.kind == 's' or spec.kind == 'f' then
    spec.period = tonumber(argv[at + 3])
    return spec, at + 4
  end
  spec.bounds = {}
  for i = 0, 5 do spec.bounds[i + 1] = tonumber(argv[at + 3 + i]) end
  return spec, at + 9
end

-- [start, end) of the fixed window holding `now` (windows.window_bounds).
local function fixed_bounds(spec, now)
  if spec.kind == 'f' then
    local start = math.floor(now / spec.period) * spec.period
    return start, start + spec.period
  end
  local b = spec.bounds
  -- Current first: with an explicit `now` Python computed it around that instant.
  for _, i in ipairs({3, 1, 5}) do
    if b[i] <= now and now < b[i + 1] then return b[i], b[i + 1] end
  end
  -- Redis's clock is more than a window away from Python's: use the closest.
  local best, gap = 3, INF
  for _, i in ipairs({3, 1, 5}) do
    local d = b[i] - now
    if now >= b[i + 1] then d = now - b[i + 1] end
    if d < gap then best, gap = i, d end
  end
  return b[best], b[best + 1]
end

-- States: g {tat}; s {window_start, previous, current}; f/c {window_start, used, end}.
local function expires_at(spec, st)
  if spec.kind == 'g' then return st[1] * spec.interval end
  if spec.kind == 's' then
    if st[3] ~= 0 then return st[1] + 2 * spec.period end
    if st[2] ~= 0 then return st[1] + spec.period end
    return -INF
  end
  if st[2] == 0 or st[1] == -INF then return -INF end
  return st[3]
end

local function encode(spec, st)
  if spec.kind == 'g' then return fmt(st[1]) end
  if spec.kind == 's' then return fmt(st[1]) .. ' ' .. int(st[2]) .. ' ' .. int(st[3]) end
  return fmt(st[1]) .. ' ' .. int(st[2]) .. ' ' .. fmt(st[3])
end

-- The held state, or nil when absent, unreadable or as good as fresh at `now`.
local function load(spec, key, now)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local st = {}
  for w in string.gmatch(raw, '%S+') do st[#st + 1] = tonumber(w) end
  local want = 3
  if spec.kind == 'g' then want = 1 end
  if #st ~= want then return nil end
  for i = 1, want do if st[i] == nil then return nil end end
  if expires_at(spec, st) <= now then return nil end
  return st
end

local function store(spec, key, st, now)
  local ms = math.ceil((expires_at(spec, st) - now) * 1000)
  if ms > 0 then
    redis.call('SET', key, encode(spec, st), 'PX', ms)
  else
    redis.call('DEL', key)  -- as good as fresh
  end
end

-- gcra.py ---------------------------------------------------------------------

local function gcra_refund(st, now, cost, spec)
  local now_u = now / spec.interval
  if st[1] <= now_u then return st end
  return {math.max(now_u, st[1] - cost)}
end

-- windows.py: fixed window ----------------------------------------------------

local function fixed_current(st, now, spec)
  local start, stop = fixed_bounds(spec, now)
  if st[1] > start + EPS then
    -- The clock went back: stay in the newer window already counted.
    return st[1], st[3], st[2]
  end
  if math.abs(st[1] - start) <= EPS then return start, stop, st[2] end
  return start, stop, 0
end

local function fixed_refund(st, now, cost, spec, charged_start)
  local start, stop, count = fixed_current(st, now, spec)
  if math.abs(charged_start - start) > EPS or count == 0 then return st end
  return {start, math.max(0, count - cost), stop}
end

-- windows.py: sliding window --------------------------------------------------

local function sliding_roll(st, now, period)
  local index = math.floor(now / period)
  if st[1] == -INF then return {index * period, 0, 0} end
  local held = round_half_even(st[1] / period)
  if index <= held then return st end
  if index == held + 1 then return {index * period, st[3], 0} end
  return {index * period, 0, 0}
end

local function sliding_refund(st, now, cost, spec, charged_start)
  local r = sliding_roll(st, now, spec.period)
  if charged_start == -INF then return st end
  local gap = round_half_even((r[1] - charged_start) / spec.period)
  if gap == 0 then return {r[1], r[2], math.max(0, r[3] - cost)} end
  if gap == 1 then return {r[1], math.max(0, r[2] - cost), r[3]} end
  return st
end

"""

# KEYS: one counter per limit. ARGV: now ("" for TIME), n, then n records (the
# same as read_spec's, read here without a table per record).
# Reply: ONE bulk string of 1 + 8 * n little-endian doubles (struct.pack): allowed
# (1/0), then per limit its decision (allowed, limit, remaining, reset_after,
# retry_after) and its new state (3 fields, padded with 0). Doubles are exact
# (inf included) and cost no '%.17g' text; integers are exact below 2**53.
# All limits are evaluated, and written only when every one allows; on a
# refusal the allowed ones are described with cost 0 (multi.check_all). An
# absent key that stays fresh is not deleted (a no-op). Stored state text is the
# same as REFUND's (load/encode), so both scripts read what the other wrote.
CHECK = r"""
-- Everything the hot path touches is a local (a global is a table lookup), each
-- window is read and decided in flat code returning several values (no table
-- per spec, state or decision), and the reply is one binary string of doubles
-- (struct.pack: exact, and no '%.17g' text per field).
local call, tonumber, floor, ceil = redis.call, tonumber, math.floor, math.ceil
local max, min, abs = math.max, math.min, math.abs
local fmt, match, pack = string.format, string.match, struct.pack
local KEYS, ARGV = KEYS, ARGV
local EPS, INF = 1e-6, math.huge
local BIG = 9007199254740992  -- 2^53: integral doubles below it print exactly with %d
local D8 = '<dddddddd'
local THREE = '^%s*(%S+)%s+(%S+)%s+(%S+)%s*$'  -- a state of 3 fields ('%S+' words)

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Exact text of a stored start or end ('%d' is much cheaper than '%.17g', and
-- window bounds are whole seconds).
local function exact(x)
  if x == floor(x) and x < BIG and x > -BIG then return fmt('%d', x) end
  return fmt('%.17g', x)
end

local function three(start, count, last)
  if start == floor(start) and last == floor(last) and start < BIG and start > -BIG
      and last < BIG and last > -BIG then
    return fmt('%d %d %d', start, count, last)
  end
  return exact(start) .. ' ' .. fmt('%d', count) .. ' ' .. exact(last)
end

local function joined(start_text, count, last_text)
  return start_text .. ' ' .. fmt('%d', count) .. ' ' .. last_text
end

local function round_half_even(x)
  local f = floor(x)
  local d = x - f
  if d > 0.5 then return f + 1 end
  if d < 0.5 then return f end
  if f % 2 == 0 then return f end
  return f + 1
end

-- What a window writes when every window allows: its state text and PX, or
-- false to DEL a key that is now as good as fresh (nothing when there was none).
local function written(raw, expires, text_of, a, b, c)
  local ms = ceil((expires - now) * 1000)
  if ms > 0 then return text_of(a, b, c), ms end
  if raw then return false end
  return nil
end

local function gcra_text(tat) return fmt('%.17g', tat) end

-- gcra.py: record g cost limit period capacity (interval = period / limit).
-- Returns the next record's index, allowed, the packed decision and state, and
-- what to write (see written).
local function gcra(raw, at, cost, limit)
  local capacity = tonumber(ARGV[at + 4])
  local interval = tonumber(ARGV[at + 3]) / limit
  local tat = 0  -- fresh
  if raw then
    local v = tonumber(raw)
    if v and not (v * interval <= now) then tat = v end
  end
  local eps = EPS / interval
  local now_u = now / interval
  local t = max(tat, now_u)
  local new_tat = t + cost
  if cost <= capacity and new_tat - now_u <= capacity + eps then
    local ahead = new_tat - now_u
    local left = max(0, min(capacity, floor(capacity - ahead + eps)))
    local text, ms = written(raw, new_tat * interval, gcra_text, new_tat)
    return at + 5, true, pack(D8, 1, capacity, left, ahead * interval, 0, new_tat, 0, 0), text, ms
  end
  local ahead = t - now_u
  local retry = INF
  if cost <= capacity then retry = max(0, (new_tat - capacity - now_u) * interval) end
  local left = max(0, min(capacity, floor(capacity - ahead + eps)))
  return at + 5, false, pack(D8, 0, capacity, left, ahead * interval, retry, tat, 0, 0)
end

-- Calendar bounds when no window sent holds `now` (Redis's clock is more than
-- a window away from Python's): the closest one.
local function closest(at)
  local best, gap = 2, INF
  for _, i in ipairs({2, 0, 4}) do
    local s, e = tonumber(ARGV[at + 3 + i]), tonumber(ARGV[at + 4 + i])
    local d = s - now
    if now >= e then d = now - e end
    if d < gap then best, gap = i, d end
  end
  return tonumber(ARGV[at + 3 + best]), tonumber(ARGV[at + 4 + best])
end

-- windows.py fixed window: record f cost limit period (epoch multiples), or
-- c cost limit s0 e0 s1 e1 s2 e2 (bounds of the previous, current and next
-- calendar windows around Python's clock; the current one is tried first).
local function fixed(raw, at, cost, limit, kind)
  local start, stop, nxt
  if kind == 'f' then
    local period = tonumber(ARGV[at + 3])
    start = floor(now / period) * period
    stop = start + period
    nxt = at + 4
  else
    nxt = at + 9
    start, stop = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6])
    if not (start <= now and now < stop) then
      start, stop = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
      if not (start <= now and now < stop) then
        start, stop = tonumber(ARGV[at + 7]), tonumber(ARGV[at + 8])
        if not (start <= now and now < stop) then start, stop = closest(at) end
      end
    end
  end
  local ws, used, we = -INF, 0, -INF  -- fresh
  local ws_text, we_text
  if raw then
    local a, b, c = match(raw, THREE)
    if a then
      ws_text, we_text = a, c
      a, b, c = tonumber(a), tonumber(b), tonumber(c)
      -- live until its end (a zero count is as good as fresh)
      if a and b and c and not (b == 0 or a == -INF) and not (c <= now) then
        ws, used, we = a, b, c
      end
    end
  end
  local count = 0
  if ws > start + EPS then
    start, stop, count = ws, we, used  -- the clock went back: stay in the newer window
  elseif abs(ws - start) <= EPS then
    count = used
  end
  local left = max(0, stop - now)
  if count + cost <= limit then
    count = count + cost
    local reset = 0
    if count ~= 0 then reset = left end
    local expires = stop
    if count == 0 or start == -INF then expires = -INF end
    local text, ms
    if start == ws and stop == we then  -- the held window: rewrite its bounds as read
      text, ms = written(raw, expires, joined, ws_text, count, we_text)
    else
      text, ms = written(raw, expires, three, start, count, stop)
    end
    return nxt, true, pack(D8, 1, limit, limit - count, reset, 0, start, count, stop), text, ms
  end
  local reset = 0
  if count ~= 0 then reset = left end
  local retry = left
  if cost > limit then retry = INF end
  return nxt, false, pack(D8, 0, limit, max(0, limit - count), reset, retry, ws, used, we)
end

local function sliding_text(start, previous, current)
  return exact(start) .. ' ' .. fmt('%d %d', previous, current)
end

local function sliding_expires(start, previous, current, period)
  if current ~= 0 then return start + 2 * period end
  if previous ~= 0 then return start + period end
  return -INF
end

local function sliding_reset(previous, current, elapsed, period)
  if current ~= 0 then return 2 * period - elapsed end
  if previous ~= 0 then return period - elapsed end
  return 0
end

local function sliding_retry(previous, current, elapsed, cost, period, limit)
  if cost > limit then return INF end
  local room = limit - current - cost
  if room >= 0 and previous > 0 then
    local at = period * (1.0 - room / previous)
    return max(0, at - elapsed)
  end
  room = limit - cost
  local at = 0
  if current > room then at = period * (1.0 - room / current) end
  return (period - elapsed) + at
end

-- windows.py sliding window: record s cost limit period.
local function sliding(raw, at, cost, limit)
  local period = tonumber(ARGV[at + 3])
  local ws, prev, cur = -INF, 0, 0  -- fresh
  if raw then
    local a, b, c = match(raw, THREE)
    if a then
      a, b, c = tonumber(a), tonumber(b), tonumber(c)
      if a and b and c and not (sliding_expires(a, b, c, period) <= now) then
        ws, prev, cur = a, b, c
      end
    end
  end
  -- roll
  local index = floor(now / period)
  local rs, rp, rc
  if ws == -INF then
    rs, rp, rc = index * period, 0, 0
  else
    local held = round_half_even(ws / period)
    if index <= held then
      rs, rp, rc = ws, prev, cur
    elseif index == held + 1 then
      rs, rp, rc = index * period, cur, 0
    else
      rs, rp, rc = index * period, 0, 0
    end
  end
  local elapsed = min(period, max(0, now - rs))
  local estimate = rp * ((period - elapsed) / period) + rc
  if estimate + cost <= limit + EPS then
    local nc = rc + cost
    local left = max(0, floor(limit - (estimate + cost) + EPS))
    local reset = sliding_reset(rp, nc, elapsed, period)
    local text, ms = written(raw, sliding_expires(rs, rp, nc, period), sliding_text, rs, rp, nc)
    return at + 4, true, pack(D8, 1, limit, left, reset, 0, rs, rp, nc), text, ms
  end
  local left = max(0, floor(limit - estimate + EPS))
  local reset = sliding_reset(rp, rc, elapsed, period)
  local retry = sliding_retry(rp, rc, elapsed, cost, period, limit)
  return at + 4, false, pack(D8, 0, limit, left, reset, retry, ws, prev, cur)
end

-- One window: record at `at` (kind, cost, limit, then by kind), counter KEYS[i];
-- `zero`: describe it at cost 0 (a refused check, multi.check_all).
local function window(i, at, zero)
  local kind = ARGV[at]
  local cost = 0
  if not zero then cost = tonumber(ARGV[at + 1]) end
  local limit = tonumber(ARGV[at + 2])
  local raw = call('GET', KEYS[i])
  if kind == 'g' then return gcra(raw, at, cost, limit) end
  if kind == 's' then return sliding(raw, at, cost, limit) end
  return fixed(raw, at, cost, limit, kind)
end

local n = tonumber(ARGV[2])

-- Window i and, recursively, those after it: each frame holds its window's
-- outcome on the stack (no table per window), and writes it only once the
-- deepest frame knows that every window allowed. Returns (all allowed, the
-- packed doubles of windows i..n).
local function step(i, at, prior)
  if i > n then return prior, '' end
  local nxt, ok, part, text, ms = window(i, at, false)
  local all, rest = step(i + 1, nxt, prior and ok)
  if all then
    if text then
      call('SET', KEYS[i], text, 'PX', ms)
    elseif text == false then
      call('DEL', KEYS[i])  -- as good as fresh
    end
  elseif ok then
    nxt, ok, part = window(i, at, true)  -- describe it without this request
  end
  return all, part .. rest
end

local all, body = step(1, 3, true)
if all then return pack('<d', 1) .. body end
return pack('<d', 0) .. body
"""

# KEYS: one counter per limit. ARGV: now, n, then n records whose cost is the
# amount to give back, each followed by the window_start of the charged state
# (unused by GCRA). A counter that expired is left alone: nothing to give back.
REFUND = (
    _PRELUDE
    + r"""
local now = clock(ARGV[1])
local n = tonumber(ARGV[2])
local at = 3
for i = 1, n do
  local spec
  spec, at = read_spec(ARGV, at)
  local charged_start = tonumber(ARGV[at])
  at = at + 1
  local st = load(spec, KEYS[i], now)
  if st then
    local new
    if spec.kind == 'g' then
      new = gcra_refund(st, now, spec.cost, spec)
    elseif spec.kind == 's' then
      new = sliding_refund(st, now, spec.cost, spec, charged_start)
    else
      new = fixed_refund(st, now, spec.cost, spec, charged_start)
    end
    if new ~= st then store(spec, KEYS[i], new, now) end
  end
end
return 1
"""
)

# Concurrency leases: KEYS[1] a sorted set of "<cost>:<lease id>" scored by the
# instant the lease expires by itself (a crashed node's slots come back).
# ARGV: now ("" for TIME), cost, limit, lease ttl (s), member "<cost>:<lease id>".
# Reply: {1 when taken else 0, slots in flight before this request}.
ACQUIRE = r"""
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local key = KEYS[1]
local cost, limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.17g', now))
local in_flight = 0
for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
  in_flight = in_flight + (tonumber(string.match(member, '^(%d+):')) or 0)
end
if in_flight + cost > limit then return {0, in_flight} end
redis.call('ZADD', key, string.format('%.17g', now + ttl), ARGV[5])
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
local ms = math.ceil((tonumber(last[2]) - now) * 1000)
redis.call('PEXPIRE', key, math.max(1, ms))
return {1, in_flight}
"""
