"""Valid inputs for every registered method, for tests that loop over ``METHODS``: methods with a
frozen shared factor get one, methods with required options get them."""
from __future__ import annotations

from fedmomentum_core.methods import METHODS

#: method -> (which factor all clients share, method_options)
_CASES = {
    "ffa_lora": ("A", None),
    "fedsvd": ("A", None),
    "rolora": ("A", {"round": 1}),
}


def method_case(method: str, B: list, A: list):
    """(B, A, extra keywords) that ``method`` accepts, from same-rank clients B, A."""
    shared, mo = _CASES.get(method, (None, None))
    if shared == "A":
        A = [A[0]] * len(A)
    if method == "fedrot_lora":
        mo = {"round": 1, "reference": (B[0].detach().clone(), A[0].detach().clone())}
    assert method in METHODS
    return B, A, ({"method_options": mo} if mo is not None else {})
