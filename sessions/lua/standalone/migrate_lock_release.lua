-- migrate_lock_release: delete `sluicegate migrate`'s run lock if it is still this run's (sluicegate/migrate.py).
-- KEYS[1] the lock; ARGV[1] this run's id. Returns 1 deleted, 0 not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
