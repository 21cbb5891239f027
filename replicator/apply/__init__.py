"""Apply: a peer's changes into the state file, conflicts decided by the resolvers or queued
for the operator."""
