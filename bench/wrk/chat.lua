-- wrk script for the sentinel-proxy benchmark.
--
-- POSTs an OpenAI chat body to /v1/chat/completions. Every body carries a
-- "conversation_id" drawn from a pool (bench-0 .. bench-<pool-1>, shuffled per
-- thread), so a proxy with sessions does a real Redis lookup on every request;
-- after the first request of each id the lookup is a hit.
--
--   wrk -t1 -c64 -d10s -s bench/wrk/chat.lua http://127.0.0.1:PORT/v1/chat/completions \
--       -- [stream] [pool=N]
--
--   The request path is the URL's path ("/v1/chat/completions" when the URL has none).
--   stream   add "stream": true to the body, and expect an SSE body ending in [DONE]
--   pool=N   number of distinct conversation ids (default 10000)
--   key=K    send "Authorization: Bearer K" (default sk-bench)
--   model=M  the model the body names (default gpt-4o-mini)
--   implicit no conversation id: a 4 KB system prompt and a first user message of
--            its own per pool entry, for a proxy that derives implicit sessions
--
-- Errors: wrk's socket errors (connect, read, write, timeout), responses whose
-- status is not 2xx, and 2xx responses with the wrong body (a non-streaming
-- reply without "chat.completion", a stream not ending in "data: [DONE]").
-- done() prints one machine-readable line:  BENCH_RESULT {json}
-- ("statuses" counts the non-2xx responses by status code).

local BODY = '{"model":"%s","messages":['
  .. '{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Benchmark request: reply with a short sentence."}],'
  .. '"conversation_id":"bench-%d"%s}'
-- Implicit sessions: the conversation is known by its system prompt and first message.
local IMPLICIT_BODY = '{"model":"%s","messages":['
  .. '{"role":"system","content":"%s"},'
  .. '{"role":"user","content":"Conversation %d: reply with a short sentence."}]%s}'
local SYSTEM_4K = string.rep("You are a careful assistant who answers briefly. ", 82)

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
local requests_pool = {}
local cursor = 0
local expect = '"chat.completion"'
local expect_plain = true
non2xx = 0
bad_body = 0
statuses = {}

function init(args)
  local stream = false
  local implicit = false
  local pool = 10000
  local key = "sk-bench"
  local model = "gpt-4o-mini"
  for _, arg in ipairs(args) do
    if arg == "stream" then
      stream = true
    elseif arg == "implicit" then
      implicit = true
    elseif string.match(arg, "^pool=%d+$") then
      pool = tonumber(string.match(arg, "^pool=(%d+)$"))
    elseif string.match(arg, "^key=") then
      key = string.sub(arg, 5)
    elseif string.match(arg, "^model=") then
      model = string.sub(arg, 7)
    else
      error("unknown argument: " .. arg)
    end
  end
  if stream then
    expect = "data: [DONE]"
  end

  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
  }
  local path = wrk.path
  if path == nil or path == "" or path == "/" then
    path = "/v1/chat/completions"
  end
  local extra = stream and ',"stream":true' or ""
  local order = {}
  for i = 1, pool do
    order[i] = i - 1
  end
  math.randomseed(1000 + (tid or 1))
  for i = pool, 2, -1 do
    local j = math.random(i)
    order[i], order[j] = order[j], order[i]
  end
  for i = 1, pool do
    local body
    if implicit then
      body = string.format(IMPLICIT_BODY, model, SYSTEM_4K, order[i], extra)
    else
      body = string.format(BODY, model, order[i], extra)
    end
    requests_pool[i] = wrk.format("POST", path, headers, body)
  end
end

function request()
  cursor = cursor % #requests_pool + 1
  return requests_pool[cursor]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    statuses[status] = (statuses[status] or 0) + 1
  elseif not string.find(body, expect, 1, expect_plain) then
    bad_body = bad_body + 1
  end
end

function done(summary, latency, requests)
  local n2, bad, by_status = 0, 0, {}
  for _, thread in ipairs(threads) do
    n2 = n2 + (thread:get("non2xx") or 0)
    bad = bad + (thread:get("bad_body") or 0)
    for status, count in pairs(thread:get("statuses") or {}) do
      by_status[status] = (by_status[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(by_status) do
    table.insert(parts, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_s":%.3f,"bytes":%d,"rps":%.2f,'
      .. '"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_p50_us":%.0f,"lat_p90_us":%.0f,'
      .. '"lat_p99_us":%.0f,"lat_max_us":%.0f,"err_connect":%d,"err_read":%d,'
      .. '"err_write":%d,"err_timeout":%d,"err_status":%d,"non2xx":%d,"bad_body":%d,'
      .. '"statuses":{%s}}\n',
    summary.requests, secs, summary.bytes, summary.requests / secs,
    latency.mean, latency.stdev, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout, e.status,
    n2, bad, table.concat(parts, ",")))
end
