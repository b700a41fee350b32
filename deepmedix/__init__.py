"""DeepMedix-R1: a platform for grounded chest X-ray reasoning models."""

__version__ = "0.1.0"
