"""Test support code: helpers shared by several test modules (not tests themselves)."""
