"""Consumers, API keys and how a raw key becomes a known caller."""
