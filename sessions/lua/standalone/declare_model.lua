-- declare_model.lua (the model registry, run with EVALSHA outside the function library: it touches
-- one global key, written by operators and workers only): make `model` the model `group` serves,
-- atomically, so that two groups claiming one model get exactly one winner.
-- KEYS[1] the registry sg:models (hash model -> group)
-- ARGV[1] model   ARGV[2] group   ARGV[3] "replace": drop the group's other model | "if_none": claim
-- the model only when the group names none yet (a worker's --backend-model never overrides an operator)
-- Returns false when declared (or, if_none, when the group already names a model: then that model as
-- {"named", model}) | the group that serves the model already.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] then return owner end
if owner then return false end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i + 1] == ARGV[2] then
    if ARGV[3] == 'if_none' then return { 'named', all[i] } end
    redis.call('HDEL', KEYS[1], all[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false
