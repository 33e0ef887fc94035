-- The RESULT line every wrk script of bench/ prints (bench/run.py reads it), shared by them:
--   dofile(os.getenv("BENCH_DIR") .. "/report.lua"); done = report(batch)
-- ``batch``: events per request, for batch scripts (nil: one event a request, no "batch" field).
function report(batch)
  return function(summary, latency, requests)
    local e = summary.errors
    local extra = batch and string.format(',"batch":%d', batch) or ""
    io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
      '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d%s}\n', summary.requests, summary.duration, e.status,
      e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(95),
      latency:percentile(99), latency.max, extra))
  end
end

-- An event's timestamp and receivedAt as Segment delivers live data: happened two seconds ago, received one
-- second later. (Times from the past would skip the work a live event costs: the /events index keeps only events
-- within the log's retention.) Offsets in seconds make distinct times within one request.
function event_times(offset)
  local t = os.time() - 2 - (offset or 0)
  return os.date("!%Y-%m-%dT%H:%M:%S", t) .. "Z", os.date("!%Y-%m-%dT%H:%M:%S", t + 1) .. ".250Z"
end
