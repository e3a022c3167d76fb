"""gate: gate definitions (one registry), statistics glue, default thresholds, rendering."""
