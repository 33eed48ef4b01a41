"""Ray Train adapter: one worker group per trial runs `run_cycle` over Ray Data shards."""
