-- wrk script: Profile API reads, GET .../profiles/user_id:u<n>/traits for 10,000 of the users single.lua writes,
-- authenticated with PROFILE_TOKEN as the HTTP Basic username. BENCH_DELAY_MS paces each connection.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local counter, delay_ms = 0, tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local auth = "Basic " .. (os.getenv("BENCH_PROFILE_AUTH") or "")

function delay()
  return delay_ms
end

request = function()
  counter = counter + 1
  local path = string.format("/v1/spaces/default/collections/users/profiles/user_id:u%d/traits?limit=20",
    (counter * 7919) % 10000 + 1)
  return wrk.format("GET", path, {["Authorization"] = auth})
end

done = report()
