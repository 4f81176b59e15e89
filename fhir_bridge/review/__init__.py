"""Who reviews a ready case: triage against rules kept as data (triage, triage_rules), the reviewer directory
(reviewers) and the choice among them (routing)."""
