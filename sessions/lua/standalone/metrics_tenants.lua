-- metrics_tenants.lua (the tenants with a label of their own on /metrics, run with EVAL outside the
-- function library: it touches one global key, written by /metrics scrapes only): admit the candidates,
-- in the order given, while fewer than the cap hold a label. Atomic, so API processes scraped at once
-- never label more than the cap between them. A tenant once admitted keeps its label (its score is its
-- admission order): its counters never move into the overflow series, which would read as traffic.
-- It also closes the set: sessions/metrics_store.py admits the member "~closed" (no tenant's name) once a
-- scrape sums a seen tenant into the overflow, and no one admitted after it is labelled.
-- KEYS[1] the labelled tenants sg:metrics_tenants (sorted set tenant -> admission order, 1 first)
-- ARGV[1] the cap (--metrics-max-tenants, >= 1)   ARGV[2..] candidate tenants, the first admitted first
-- Returns the first ARGV[1] labelled tenants, in admission order (a lowered cap labels the earliest).
local cap = tonumber(ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
local last = 0
if count > 0 then last = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]) end
for i = 2, #ARGV do
  if count >= cap then break end
  if redis.call('ZADD', KEYS[1], 'NX', last + 1, ARGV[i]) == 1 then
    last = last + 1
    count = count + 1
  end
end
return redis.call('ZRANGE', KEYS[1], 0, cap - 1)
