"""`persona-sync dev`: the supervisor and the embedded redis-server launcher."""
