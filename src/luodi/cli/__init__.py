"""The `luodi` command: a thin layer over the Python API (whatever it does, a program can do)."""
