from vlfast import info
from vlfast.ops.backends import BACKENDS, OP_SUPPORT


def test_info_lists_every_op_and_backend_with_a_reason():
    text = info.report()
    assert "torch " in text and "extension vlfast._C:" in text
    for op in OP_SUPPORT:
        block = text.split(f"{op}:")[1]
        for backend in BACKENDS:
            assert f"  {backend:7} available" in block or f"  {backend:7} unavailable: " in block
    # No GPU here: the cuda backend must say why it cannot run.
    assert "  cuda    unavailable: " in text
