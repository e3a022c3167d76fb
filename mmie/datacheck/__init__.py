"""`mmie data check`: what a text file holds before any model loads."""
