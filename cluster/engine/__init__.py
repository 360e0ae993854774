"""The inference engine: sequences, block manager, scheduler and the step loop."""
