-- ready.lua (control plane): make a session's head request ready in its group, and dispatch.
-- Idempotent (the repair pass may repeat it; see `ready` in includes/dispatch.lua).
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] ready spec JSON (from submit, finish or cancel)
-- Returns "started" | "ready" | "known" | "stale" (a later head of the session waits already).
return ready(KEYS[1], cjson.decode(ARGV[3]), clock(), tonumber(ARGV[2]))
