"""moejax.lab: compare, plot and understand router variants (docs/lab.md)."""
