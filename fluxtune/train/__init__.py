"""Ray Train adapter: one worker group per trial runs `run_cycle`, each worker streaming its share of the cache."""
