"""The contract: what the edge writes and the workers read (the stream entry, every Redis key
name, the settings, how to connect, the one clock, the link and click cache entries, the
drop reasons and fraud's vocabulary). Both sides import it; it imports nothing of theirs."""
