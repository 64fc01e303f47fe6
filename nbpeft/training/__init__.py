"""Training: the options, the loop, its events and live display, checkpoints, memory, precision, the loss and attention paths, several processes, cluster jobs."""
