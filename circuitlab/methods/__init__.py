"""Methods: one implementation each. Metrics, directions (difference-in-means, orthogonalization),
direction evaluation, interventions (hooks that patch, ablate, add), attribution, ranking, probes,
abliteration, Heretic-compatible scoring, and the patching engine with its prompt pairing."""
