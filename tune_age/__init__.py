"""tune_age: hyperparameter search for CNNs that classify a person's age group from a face photo."""

__version__ = "0.1.0"
