"""Test and demo helpers that users may also find useful: a real Prefect server launcher and the
Hyper-V host simulator served over real SSH. Nothing here imports prefect."""
