"""VPGTrans: moving a trained visual prompt generator to a new LLM (SPEC.md section 6)."""
