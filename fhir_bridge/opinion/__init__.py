"""The answer: the DiagnosticReport's rules (report), its coded content (content), panels' consensus and
dissents (consensus), and the ITI-65 bundle that writes it back into the record (writeback)."""
