-- wrk script: one Segment event per request, every messageId unique, 20,000 distinct users; each event carries
-- receivedAt, as Segment's webhook deliveries do.
-- Optional pacing: BENCH_DELAY_MS per connection turns wrk into a fixed-rate load (rate = connections * 1000 / delay).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local counter, prefix, delay_ms = 0, "run", tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = (args[1] or "run") .. "-" .. tostring(tid)
end

function delay()
  return delay_ms
end

request = function()
  counter = counter + 1
  local user = counter % 20000
  local body
  local at, received = event_times()
  if counter % 5 == 0 then
    body = string.format('{"type":"identify","userId":"u%d","anonymousId":"a%d","messageId":"%s-%d",' ..
      '"timestamp":"%s","receivedAt":"%s",' ..
      '"traits":{"plan":"pro","ltv":%d,"email":"u%d@example.com"},' ..
      '"context":{"library":{"name":"analytics.js"}}}', user, user, prefix, counter, at, received, counter % 900,
      user)
  else
    body = string.format('{"type":"track","event":"Order Completed","userId":"u%d","messageId":"%s-%d",' ..
      '"timestamp":"%s","receivedAt":"%s",' ..
      '"properties":{"order_id":"%s-%d","revenue":%d,' ..
      '"products":[{"category":"books"}]},"context":{"library":{"name":"analytics.js"}}}',
      user, prefix, counter, at, received, prefix, counter, counter % 200)
  end
  return wrk.format("POST", "/segment", {["Content-Type"] = "application/json"}, body)
end

done = report()
