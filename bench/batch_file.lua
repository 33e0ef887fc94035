-- wrk script: Webhooks (Actions) batches read from BENCH_BODIES (one JSON array of events per line), in turn.
-- replay_load writes the archive it imports there, so batch intake and import are measured on the same events.
local bodies, n = {}, 0

function init(args)
  for line in io.lines(os.getenv("BENCH_BODIES")) do bodies[#bodies + 1] = line end
end

request = function()
  n = n % #bodies + 1
  return wrk.format("POST", "/segment", {["Content-Type"] = "application/json"}, bodies[n])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,"batch":%d}\n', summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, tonumber(os.getenv("BENCH_BATCH") or "1000")))
end
