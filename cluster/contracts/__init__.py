"""Step contracts between the engine and the workers (leaf modules: pure Python, no torch)."""
