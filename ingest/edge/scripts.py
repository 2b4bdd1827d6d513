"""The edge's Lua: each script alone, or every script of a micro-batch in one call.

A script the micro-batcher runs (``RedisBatcher.script``) is a *body*: Lua that reads its own
``KEYS`` and ``ARGV`` and may call what ``PRELUDE`` defines, notably ``rate_window``, the
sliding-window rate limit (``ingest.edge.ratelimit``). It is sent one of two ways:

- ``standalone(body)``: the prelude, then the body as a function of ``KEYS`` and ``ARGV``;
  its own ``EVALSHA``.
- ``merged(bodies)``: one script holding every registered body (``Scripts`` keeps them,
  and makes and splits the merged calls). The batcher sends the
  scripts that lead the requests of a round trip as one ``EVALSHA`` of it (``_DISPATCH``
  says how its arguments carry each call), and each request gets its own reply back: an
  error of one body (``pcall``) is that call's error reply, the others still run, as each
  would have alone.

Inside one script, a key a body reads through ``rs_get`` is read from Redis once: the
requests of a micro-batch read the same few keys (the link cache's state, a kill switch,
their links). A script is atomic, so the value stays what Redis holds until a body of the
same script writes it: a body that writes a key it read forgets it, and after a call of any
body not registered with ``keeps_memo`` (one that may write keys others read) the whole
memo is forgotten.

Inside one script, the rate limit of every request to the same subject is decided together
and exactly: the time is read once, the window pruned and counted once, and the admitted
requests' times pushed (one ``LPUSH``) and the list's expiry moved (one ``PEXPIRE``) when
the script ends (``rs_flush``), whether or not a body failed after its admission, as a
request admitted alone counts even when its own script fails later. The admissions are the
same as one script per request would make: each request is admitted while fewer than the
limit are in the window, counting those this script admitted already. An ``LPUSH`` that fails
as the script ends (a Redis out of memory under ``noeviction``, which refuses the appends
before it) leaves the requests admitted and uncounted, as without Redis, and never fails the
replies of what the bodies wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from ingest.contract.connections import Command

# rate_window(key, window ms, limit): the verdict {admitted (1/0), remaining, retry
# after ms}; rs_flush(): the deferred writes; rs_get(key): GET, each key read once a script
# (a body that writes a key it read forgets it: rs_memo[key] = nil)
PRELUDE = """
local rs_now
local rs_sets, rs_keys = {}, {}
local rs_memo = {}
local function rs_get(key)
  local v = rs_memo[key]
  if v == nil then
    v = redis.call('GET', key)
    rs_memo[key] = v
  end
  return v
end
local function rate_window(key, window_ms, limit)
  window_ms = tonumber(window_ms)
  limit = tonumber(limit)
  if not rs_now then
    local t = redis.call('TIME')
    rs_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local s = rs_sets[key]
  if s == nil or s.window ~= window_ms then
    -- the times that left the window, from the tail (the oldest): a look at the last two,
    -- then at twice as many while every time looked at had left
    local cutoff, probe = rs_now - window_ms, 2
    while true do
      local tail = redis.call('LRANGE', key, -probe, -1)
      local stale = 0
      for i = #tail, 1, -1 do
        if tonumber(tail[i]) > cutoff then break end
        stale = stale + 1
      end
      if stale > 0 then redis.call('LTRIM', key, 0, -1 - stale) end
      if stale < probe then break end
      probe = math.min(probe * 2, 1024)
    end
    local n = redis.call('LLEN', key)
    if s == nil then
      s = {adds = 0}
      rs_sets[key] = s
      rs_keys[#rs_keys + 1] = key
    end
    s.window = window_ms
    s.n = n + s.adds
  end
  if s.n < limit then
    s.n = s.n + 1
    s.adds = s.adds + 1
    return {1, limit - s.n, 0}
  end
  local first = tonumber(redis.call('LINDEX', key, -1)) or rs_now
  return {0, 0, first + window_ms - rs_now}
end
local function rs_write()
  for _, key in ipairs(rs_keys) do
    local s = rs_sets[key]
    if s.adds > 0 then
      local times = {}
      for i = 1, math.min(s.adds, 2000) do times[i] = rs_now end
      for i = 1, s.adds, 2000 do
        redis.call('LPUSH', key, unpack(times, 1, math.min(2000, s.adds - i + 1)))
      end
      redis.call('PEXPIRE', key, s.window)
    end
  end
end
local function rs_flush()
  pcall(rs_write)
end
"""

# standalone: the body's error (a table from redis.call, or a Lua error's text) raised again
# after the deferred writes, so its reply is the error it was
_ALONE = """
local rs_ok, rs_reply = pcall(rs_main, KEYS, ARGV)
rs_flush()
if not rs_ok then error(rs_reply, 0) end
return rs_reply
"""

# ARGV[1] = n, the calls; ARGV[2 .. 3n+1] = (the body's number, its keys' count, its
# arguments' count) for each call in turn; then the arguments of each call in turn. KEYS:
# each call's keys in turn. Reply: n replies, each what the call answered (an error reply
# for an error; nil for no value).
_DISPATCH = """
local n = tonumber(ARGV[1])
local out = {}
local h, a, k = 2, 2 + 3 * n, 0
for c = 1, n do
  local fn, nk, na = tonumber(ARGV[h]), tonumber(ARGV[h + 1]), tonumber(ARGV[h + 2])
  h = h + 3
  local ok, reply = pcall(rs_fn[fn], {unpack(KEYS, k + 1, k + nk)}, {unpack(ARGV, a, a + na - 1)})
  k = k + nk
  a = a + na
  if not rs_keeps[fn] then rs_memo = {} end
  if not ok then
    if type(reply) ~= 'table' then reply = {err = tostring(reply)} end
  elseif reply == nil then
    reply = false
  end
  out[c] = reply
end
rs_flush()
return out
"""


def standalone(body: str) -> str:
    """The script that runs ``body`` by itself."""
    return f"{PRELUDE}local function rs_main(KEYS, ARGV)\n{body}\nend\n{_ALONE}"


def merged(bodies: Sequence[str], keeps: Sequence[bool] = ()) -> str:
    """The script that runs calls of any of ``bodies`` (numbered from 1, in order); those
    whose ``keeps`` is true leave the memo of reads as it is (see the module's doc)."""
    functions = "".join(f"rs_fn[{i}] = function(KEYS, ARGV)\n{body}\nend\n" for i, body in enumerate(bodies, 1))
    kept = "".join(f"rs_keeps[{i}] = true\n" for i, keep in enumerate(keeps, 1) if keep)
    return f"{PRELUDE}local rs_fn, rs_keeps = {{}}, {{}}\n{functions}{kept}{_DISPATCH}"


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


class Scripts:
    """The bodies a micro-batcher registered, each by its standalone script's sha, and the
    merged script of them all (made again when a body is added)."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}  # every script by its sha: what NOSCRIPT loads again
        self._bodies: list[str] = []  # numbered from 1 in the merged script
        self._keeps: list[bool] = []  # whether each body leaves the memo of reads as it is
        self._number: dict[str, int] = {}  # a standalone script's sha -> its body's number
        self._merged_sha: str | None = None

    def register(self, body: str, *, keeps_memo: bool = False) -> str:
        """The sha of ``body``'s standalone script, for ``("EVALSHA", sha, ...)``.
        ``keeps_memo``: the body writes no key that a body reads through ``rs_get``, but
        those it forgets itself."""
        source = standalone(body)
        sha = _sha(source)
        if sha not in self._number:
            self.sources[sha] = source
            self._bodies.append(body)
            self._keeps.append(keeps_memo)
            self._number[sha] = len(self._bodies)
            self._merged_sha = None
        return sha

    def leading(self, requests: Iterable[Sequence[Command]]) -> list[int]:
        """Where the merged script may take its calls from (indices in the round trip of
        ``requests``' commands, in order): the calls of registered scripts that lead each
        request's commands. Moved ahead of the round trip's other commands together, in
        order, they still run before the rest of their own request's; another request's
        commands are concurrent with them, in any order."""
        lead: list[int] = []
        i = 0
        number = self._number
        for commands in requests:
            j = i
            for cmd in commands:
                if cmd[0] != "EVALSHA" or cmd[1] not in number:
                    break
                lead.append(j)
                j += 1
            i += len(commands)
        return lead

    def merge(self, commands: list[Command], lead: list[int]) -> list[Command]:
        """The round trip to send: one EVALSHA of the merged script for the calls at
        ``lead`` (``_DISPATCH``'s arguments), then the other commands in order."""
        if self._merged_sha is None:
            source = merged(self._bodies, self._keeps)
            self._merged_sha = _sha(source)
            self.sources[self._merged_sha] = source
        head: list[Any] = [len(lead)]
        keys: list[Any] = []
        args: list[Any] = []
        number = self._number
        for i in lead:
            call = commands[i]
            n_keys = int(call[2])
            head += (number[call[1]], n_keys, len(call) - 3 - n_keys)
            keys += call[3 : 3 + n_keys]
            args += call[3 + n_keys :]
        led = set(lead)
        return [
            ("EVALSHA", self._merged_sha, len(keys), *keys, *head, *args),
            *(c for i, c in enumerate(commands) if i not in led),
        ]

    @staticmethod
    def split(replies: list[Any], lead: list[int]) -> list[Any] | None:
        """The replies to ``merge``'s round trip in the order of the commands it was made
        from, the merged script's split back to its calls (its error, NOSCRIPT or a Redis
        out of memory, is each call's); None when the merged script's reply cannot be its."""
        first = replies[0]
        if isinstance(first, Exception):
            calls: list[Any] = [first] * len(lead)
        elif isinstance(first, list) and len(first) == len(lead):
            calls = first
        else:
            return None
        out: list[Any] = [None] * (len(replies) - 1 + len(lead))
        for i, reply in zip(lead, calls, strict=True):
            out[i] = reply
        led = set(lead)
        rest = iter(replies[1:])
        for i in range(len(out)):
            if i not in led:
                out[i] = next(rest)
        return out
