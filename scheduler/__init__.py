"""Scheduling: the policy settings, the clock-driven scheduler loop, and runtime tuning."""
