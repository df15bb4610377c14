"""Monitoring: drift statistics and live accuracy on what the service sees (next: the monitor flow)."""
