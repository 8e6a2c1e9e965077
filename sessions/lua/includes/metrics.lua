-- metrics.lua: counters and histogram buckets kept in Redis, so that every API process reports the
-- fleet's totals. Each plane writes its own share (the data plane into its bucket's hash, the control
-- plane into its group's); /metrics adds the shares up (api/metrics.py).

local function observe(mkey, name, label, secs)
  local bucket = #BUCKETS + 1
  for i, le in ipairs(BUCKETS) do
    if secs <= le then bucket = i; break end
  end
  redis.call('HINCRBY', mkey, name .. '|' .. label .. '|' .. bucket, 1)
  if secs ~= 0 then redis.call('HINCRBYFLOAT', mkey, name .. '|' .. label .. '|sum', secs) end
end

local function count(mkey, name, label, by)
  redis.call('HINCRBY', mkey, name .. '|' .. label, by or 1)
end
