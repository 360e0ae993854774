"""Optional native CPU kernels, compiled on first use; callers fall back to plain torch without them."""
