"""The once-only append: one script that appends an event unless its idempotency key has a
record, and stores the key's answer when it appends. The edge sends it for a keyed event
(``ingest.edge.idempotency``), and the spool's drain for a keyed row it replays
(``ingest.spool.drain``), so a key counts once whichever copy reaches Redis first."""

# KEYS[1] the key's record, KEYS[2] the stream (one hash tag); on a single Redis or Sentinel
# KEYS[3] the partition layout and KEYS[4..] the key's records in the partitions an earlier
# partition count gave it (``ingest.contract.layout``; on a Redis Cluster they sit in other
# slots: neither is passed, ``ingest.edge.idempotency.Idempotency.earlier``). ARGV: answer,
# window ms, the count the caller routed by and the change time (``Layout.changed_ms``) of
# the layout it read (both '' on a Cluster), then the envelope's fields and values
# (``Envelope.entry``). A caller that routed by another layout than the one in Redis now is
# refused (STALE): its copy would sit where a copy routed by the current count is not looked
# for, or its earlier-count records would miss a count the layout has had since (4 -> 3 ->
# 4: the same count, another layout). The XADD comes first: if it fails (OOM), nothing was
# written, and no answer is stored for an event that was never appended. A stream that does
# not exist (a retired partition) is not made: GONE.
APPEND_ONCE = """
local routed = tonumber(ARGV[3])
local from = 3
if routed then
  local raw = redis.call('GET', KEYS[3])
  if raw then
    local now = cjson.decode(raw)
    if now['count'] ~= routed or (tonumber(now['changed_ms']) or 0) ~= tonumber(ARGV[4]) then
      return redis.error_reply('STALE ' .. KEYS[2])
    end
  end
  from = 4
end
local first = redis.call('GET', KEYS[1])
if first then return first end
for i = from, #KEYS do
  first = redis.call('GET', KEYS[i])
  if first then return first end
end
if not redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', unpack(ARGV, 5)) then
  return redis.error_reply('GONE ' .. KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
