"""The training engine: loop, optimizer and schedule, metrics, collective checkpoint state."""
