"""Live backups and restores of the cluster's VMs: see engine.py (the backup), store.py (the layout)."""
