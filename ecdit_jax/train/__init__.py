"""Training: the train state, the jitted step, its shardings, the loop and what it calls."""
