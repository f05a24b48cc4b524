"""Building blocks of the models: layers, the dynamic-fusion score, interest discovery, the training protocol."""
