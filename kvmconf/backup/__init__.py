"""Live backups and restores of the cluster's VMs: see engine.py (the backup),
recovery.py (what an interrupted run left), store.py (the layout)."""
