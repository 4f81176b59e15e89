"""The audit trail's core: BALP AuditEvent builders (events), the hash chain and its checkpoints (chain), and
who the current work is for (context). The log itself is an adapter (fhir_bridge.adapters.audit_log)."""
