-- wrk script for every benchmark run. Arguments: delay_ms token_file [cycle]
-- delay_ms > 0 paces the run: each connection waits between its requests for a random
-- time with a mean of delay_ms (exponential, as the gaps between independent arrivals
-- are), so the offered rate is about connections * 1000 / (delay_ms + latency). A fixed
-- pause kept the connections in step: they sent in bursts, which queued. wrk times a
-- request from the moment it is written, so the pause is not part of the latency. 0 is a
-- closed loop. wrk asks for delay() after init(), so it is defined there, and only for
-- paced runs.
-- With a token file every request carries the next token, so none repeats and every
-- check is a cache miss; when the file runs out the thread stops, so the run ends
-- early instead of turning into cache hits. "-" means none: wrk's -H header is sent.
-- With "cycle" the file is a pool of users' tokens, taken in turn and started again at its
-- end: each token repeats once every pool-size requests.
-- done() prints the latency distribution for the CDF plot.
local tokens = nil
local index = 0
local cycle = false

function init(args)
  local delay_ms = tonumber(args[1]) or 0
  if delay_ms > 0 then
    math.randomseed(os.time() + math.floor(os.clock() * 1e6))
    function delay()
      return math.floor(-math.log(1 - math.random()) * delay_ms + 0.5)
    end
  end
  cycle = args[3] == "cycle"
  if args[2] and args[2] ~= "-" then
    tokens = {}
    for line in io.lines(args[2]) do
      tokens[#tokens + 1] = line
    end
  end
end

function request()
  if tokens then
    index = index + 1
    if index > #tokens then
      if cycle then
        index = 1
      else
        wrk.thread:stop()
        index = #tokens
      end
    end
    return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. tokens[index] })
  end
  return wrk.format()
end

function done(summary, latency, requests)
  for _, p in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.9, 99.99}) do
    io.write(string.format("PCT %g %d\n", p, latency:percentile(p)))
  end
end
