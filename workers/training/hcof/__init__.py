"""HCOF: hierarchical, topology-aware gradient compression overlapped with computation."""
