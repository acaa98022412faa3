"""Training: the train state and steps (`step`), the loop (`loop`), metrics output (`metrics`)."""
