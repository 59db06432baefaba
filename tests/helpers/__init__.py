"""Helpers shared by the tests: inputs and checks of attention, data, models, child processes and ranks."""
