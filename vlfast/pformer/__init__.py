"""`python -m vlfast.pformer train`: the P-Former's text-only training (SPEC.md section 7). The
model, and the alignment a VPG's training adds as an extra loss, are in vlfast.models.pformer."""
