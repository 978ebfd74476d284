"""Staged rollouts: the state machine (state.py), the plan and gate arithmetic (plan.py), the engine."""
