"""User feedback back into the behaviour log: signed impression tokens, a durable segment log, compaction."""
