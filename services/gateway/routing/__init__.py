"""Routing internals: worker views, policies, the approximate tree, the index's health."""
