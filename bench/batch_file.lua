-- wrk script: Webhooks (Actions) batches read from BENCH_BODIES (one JSON array of events per line), in turn.
-- replay_load writes the archive it imports there, so batch intake and import are measured on the same events.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local bodies, n = {}, 0

function init(args)
  for line in io.lines(os.getenv("BENCH_BODIES")) do bodies[#bodies + 1] = line end
end

request = function()
  n = n % #bodies + 1
  return wrk.format("POST", "/segment", {["Content-Type"] = "application/json"}, bodies[n])
end

done = report(tonumber(os.getenv("BENCH_BATCH") or "1000"))
