-- wrk script: Open Inference Protocol V2 inference requests, a different user on each.
--
--   wrk -t2 -c16 -d30s -s bench/wrk/infer.lua http://127.0.0.1:8000
--   wrk -t2 -c16 -d30s -s bench/wrk/infer.lua http://127.0.0.1:8000/direct   # a route prefix
--
-- Each request is POST <prefix>/v2/models/<WRK_MODEL>/infer, where <prefix> is the URL's path
-- (none above), with a JSON V2 body and an `x-user-id` header. Environment:
--   WRK_MODEL    the model name in the path (default recommender)
--   WRK_VERSION  pin a version: sent as `x-model-version` (default: none, the traffic split)
--   WRK_BODIES   a file of V2 JSON bodies, one a line, sent in turn (default: the demo
--                recommender's request below: one user profile, a slate of 6 items, top_k 1)
--   WRK_USERS    draw users from this many (default: a new user on every request, so sticky
--                routing spreads them over the versions as real traffic does)
-- done() prints one JSON line (after wrk's own summary): requests, duration_s, rps, latency
-- p50/p90/p99/max/mean in ms, socket errors (connect, read, write, timeout) and non_2xx, the
-- responses whose status is not 2xx (wrk's own `status` error count only sees those > 399).

local DEFAULT_BODY = [[{"inputs": [{"name": "user", "datatype": "BYTES", "shape": [1], "data": ["Someone who reads about emperors, old wars and ancient civilisations, commutes by train every morning, is learning Spanish on their phone, works as an accountant in a busy office and works from home as a software developer."]}, {"name": "items", "datatype": "BYTES", "shape": [6], "data": ["a thirty-day strength training programme", "a book on the ancient Egyptian pharaohs", "a biography of a bebop trumpet player", "a season inside a struggling football club", "a cookbook of slow-cooked winter stews", "a guide to growing tomatoes on a balcony"]}], "parameters": {"top_k": 1}}]]

local model = os.getenv("WRK_MODEL") or "recommender"
local version = os.getenv("WRK_VERSION")
if version == "" then version = nil end
local users = tonumber(os.getenv("WRK_USERS") or "") or 0
local prefix = (wrk.path or "/"):gsub("/+$", "")
local path = prefix .. "/v2/models/" .. model .. "/infer"

local function read_bodies(file)
  local found = {}
  local handle = assert(io.open(file, "r"), "WRK_BODIES: cannot open " .. file)
  for line in handle:lines() do
    if line:match("%S") then found[#found + 1] = line end
  end
  handle:close()
  assert(#found > 0, "WRK_BODIES: no body in " .. file)
  return found
end

-- The main state sets each thread's id; done() reads every thread's count of non-2xx answers.
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  threads[#threads + 1] = thread
end

-- Per thread (each has a Lua state of its own): its bodies, its request counter, and its
-- count of non-2xx answers (a global: done() reads it with thread:get).
local bodies, sent = nil, 0
non_2xx = 0

function init(args)
  local file = os.getenv("WRK_BODIES")
  bodies = (file and file ~= "") and read_bodies(file) or { DEFAULT_BODY }
  math.randomseed(id * 7919)
end

function request()
  sent = sent + 1
  local user
  if users > 0 then
    user = "wrk-user-" .. math.random(users)
  else
    user = "wrk-" .. id .. "-" .. sent -- unique across threads and requests
  end
  local headers = { ["content-type"] = "application/json", ["x-user-id"] = user }
  if version then headers["x-model-version"] = version end
  return wrk.format("POST", path, headers, bodies[(sent - 1) % #bodies + 1])
end

function response(status, headers, body)
  if status < 200 or status > 299 then non_2xx = non_2xx + 1 end
end

local function ms(microseconds)
  return string.format("%.2f", microseconds / 1000)
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("non_2xx") or 0)
  end
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    '{"path": "%s", "model": "%s", "version": %s, "threads": %d, "requests": %d, '
      .. '"duration_s": %.3f, "rps": %.2f, "p50_ms": %s, "p90_ms": %s, "p99_ms": %s, '
      .. '"max_ms": %s, "mean_ms": %s, "socket_errors": {"connect": %d, "read": %d, '
      .. '"write": %d, "timeout": %d}, "non_2xx": %d, "bytes": %d}\n',
    path, model, version and ('"' .. version .. '"') or "null", #threads, summary.requests,
    seconds, seconds > 0 and summary.requests / seconds or 0,
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency.max), ms(latency.mean), e.connect, e.read, e.write, e.timeout, bad,
    summary.bytes))
end
