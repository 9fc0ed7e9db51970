"""Diagnostics beside the scores: what a model's features carry (probe), how its yes/no answers rank (yesno), how
well it predicts held-out conversations (likelihood), and its scores stage by stage (stages)."""
