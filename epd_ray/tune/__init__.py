"""Ray Tune: the search over loss weights and mu."""
