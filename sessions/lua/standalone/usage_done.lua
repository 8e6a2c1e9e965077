-- usage_done.lua (run with EVAL by sessions/usage.py): drop a bucket's folded usage once every hour
-- applied it (only that fold: a newer one taken meanwhile stays).
-- KEYS[1] usage being folded sg:{s:<bucket>}:uf   ARGV[1] fold sequence
-- Returns 1 | 0.
if redis.call('HGET', KEYS[1], '#') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
