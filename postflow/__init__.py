"""Postflow: outbound mail delivery where every queued message is a durable Temporal workflow."""
