-- migrate_lock_renew: renew `sluicegate migrate`'s run lock while it is still this run's (sluicegate/migrate.py).
-- KEYS[1] the lock; ARGV[1] this run's id, ARGV[2] the lock's new TTL in ms. Returns 1 renewed, 0 not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
