"""Evaluation (layer 4): reconstruction, sparsity, dead features and the spliced model (`metrics`)."""
