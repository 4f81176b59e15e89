"""Who may see what: SMART scopes and role ceilings (scopes), tenants and assignments (tenancy), and the
pseudonymised view of reviewers abroad (pseudonym)."""
