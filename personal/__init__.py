"""One user's side of a run: its recommendations, what its device holds and sent, consent and forgetting."""
