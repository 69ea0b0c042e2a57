"""full_ft: the old expert simply continues training on the new domain (the paper's forgetting case)."""
from .method import Method


class FullFineTune(Method):
    name = "full_ft"
