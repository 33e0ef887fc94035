"""Redis: the store and the Lua script that applies an event, refresh scheduling and the one place for queue
and job names, operator actions (replay, forget, purge), status, lock holders."""
