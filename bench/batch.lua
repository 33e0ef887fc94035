-- wrk script: Webhooks (Actions) batches of BENCH_BATCH events (default 1000), every messageId unique.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local counter, prefix, size = 0, "run", tonumber(os.getenv("BENCH_BATCH") or "1000")
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = (args[1] or "run") .. "-" .. tostring(tid)
end

request = function()
  local parts = {}
  local times = {}
  for s = 0, 59 do times[s] = {event_times(s)} end
  for i = 1, size do
    counter = counter + 1
    local user = counter % 50000
    -- with receivedAt, as Segment's deliveries carry it (without one, the receiver writes its own into the log)
    parts[i] = string.format('{"type":"track","event":"Page Viewed","userId":"u%d","messageId":"%s-%d",' ..
      '"timestamp":"%s","receivedAt":"%s","properties":{"path":"/p"},' ..
      '"context":{"library":{"name":"analytics.js"}}}',
      user, prefix, counter, times[counter % 60][1], times[counter % 60][2])
  end
  return wrk.format("POST", "/segment", {["Content-Type"] = "application/json"}, "[" .. table.concat(parts, ",") .. "]")
end

done = report(size)
