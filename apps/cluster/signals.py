"""Sent after commit when a node is registered or changes state (the scheduler and dashboard listen)."""
from django.dispatch import Signal

node_changed = Signal()
