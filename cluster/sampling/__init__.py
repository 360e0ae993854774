"""Turning logits into next tokens: penalties, truncation (top-k/p, min-p) and seeded sampling."""
