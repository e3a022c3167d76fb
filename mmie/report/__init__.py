"""report: the HTML page built from artifacts."""
