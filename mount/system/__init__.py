"""The machine a mount runs on: what it needs of it, and checks of it (doctor.py)."""
