"""`sweep`: a small grid of unlearning runs chosen on validation, the winner tested once."""
