"""Training (layer 4): checkpoints (`checkpoint`), the loop around the step (`loop`) and the one run
setup shared by the single process and Ray (`run`)."""
