"""Fakes that stand in for hardware the test machines do not have (used only by tests)."""
