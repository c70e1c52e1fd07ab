-- wrk script for bench/run.py.
--
-- BENCH_MACS=FILE: each request is GET /ipxe?mac=<a random MAC from FILE>&platform=pcbios
-- (FILE has one MAC per line). Without BENCH_MACS, every request is GET of the URL's path.
-- Both provision and nginx get exactly the same requests; nginx maps /ipxe to a static file
-- and ignores the query.
--
-- done() prints one line "BENCHJSON {...}" with requests, duration, latency percentiles
-- (microseconds) and the error counts, so run.py does not parse wrk's text.

local macs = {}
local file = os.getenv("BENCH_MACS")
if file and file ~= "" then
  for line in io.lines(file) do
    if line ~= "" then macs[#macs + 1] = line end
  end
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

if #macs > 0 then
  request = function()
    local m = macs[math.random(#macs)]
    return wrk.format("GET", "/ipxe?mac=" .. m .. "&platform=pcbios")
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
