"""Coalescing sessions over cassandra-driver and acsylla."""

from coalesce.scylla.rows import Rows
from coalesce.scylla.session import CoalescingSession

__all__ = ["CoalescingSession", "Rows"]
