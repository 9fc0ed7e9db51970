"""Diagnostics beside the scores: what a model's features carry (probe), how its yes/no answers rank (yesno), how
well it predicts held-out conversations (likelihood), its scores stage by stage (stages), and whether it describes
an image's facts without looping (describe)."""
