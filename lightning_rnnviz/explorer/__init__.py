"""The explorer: interactive views over the probe sets, in TensorBoard and as one HTML file."""
