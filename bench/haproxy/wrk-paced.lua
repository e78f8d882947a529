-- wrk script for paced runs. Arguments: delay_ms [token_file]
-- Each connection waits delay_ms between its requests, so the offered rate is about
-- connections * 1000 / delay_ms and nothing queues in the client. wrk times a request
-- from the moment it is written, so the pause is not part of the latency.
-- With a token file every request carries the next token, so none repeats and every
-- check is a cache miss; when the file runs out the thread stops, so the run ends
-- early instead of turning into cache hits. Without one, wrk's -H header is sent.
-- done() prints the latency distribution for the CDF plot.
local tokens = nil
local index = 0

local delay_ms = 10

function init(args)
  delay_ms = tonumber(table.remove(args, 1))
  if args[1] and args[1] ~= "-" then
    tokens = {}
    for line in io.lines(args[1]) do
      tokens[#tokens + 1] = line
    end
  end
end

function request()
  if tokens then
    index = index + 1
    if index > #tokens then
      wrk.thread:stop()
      index = #tokens
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

function delay()
  return delay_ms
end
