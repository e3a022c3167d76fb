"""mmie: multilingual machine unlearning with interpretability tools."""

__version__ = "0.1.0"
